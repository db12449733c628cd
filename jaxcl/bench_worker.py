"""One row of ``jaxcl bench`` in a process of its own, driven over stdin/stdout.

``python -m jaxcl.bench_worker SPEC_JSON`` builds one train step (``side``: ``"jaxcl"`` with
the CL methods of ``methods``, or ``"torch"``: transformers + torch AdamW), in ``dtype``
(``"fp32"``; ``"bf16"``: bf16 compute, float32 weights and optimizer state; torch under
``autocast``), runs its warm-up steps, prints one JSON line ``{"ready": ...}`` and then answers
each command line of stdin with one JSON line:

- ``run N``: run N steps, timing each one alone (``{"times": [...]}``, seconds);
- ``stats``: ``{"peak_gib": ..., "memory_kind": ...}``, the peak memory of this process: its
  peak RSS on CPU, the device's peak bytes in use on an accelerator;
- ``quit``.

jaxcl's step is compiled ahead of time from the shapes alone (``jit(...).lower(...).compile()``,
as MaxText's ``train_compile`` does) before its parameters and optimizer state are allocated;
then JAX's tracing and lowering caches are cleared (the compiled step is all that runs) and the
freed heap is handed back (:func:`jaxcl.host.release_heap`). ``first_step_s`` counts that
compilation.
The torch side imports neither jax nor jaxcl's model code, so its memory is torch's own.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

DTYPES = ("fp32", "bf16")


def random_batch(vocab_size: int, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Token ids uniform in ``[3, vocab)`` (``[batch, seq + 1]``) and an all-ones loss mask."""
    rng = np.random.default_rng(seed)
    return {
        "tokens": rng.integers(3, vocab_size, size=(batch, seq + 1)).astype(np.int32),
        "loss_mask": np.ones((batch, seq + 1), np.float32),
    }


def peak_rss_gib() -> float:
    """This process's peak resident set size: ``VmHWM`` of ``/proc/self/status`` on Linux (the
    high-water mark of this program's own memory; ``ru_maxrss`` carries a forking parent's peak
    over ``exec``), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    scale = 2**30 if sys.platform == "darwin" else 2**20  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


Step = tuple[Callable[[], None], Callable[[], tuple], float]


def _jaxcl_step(spec: dict[str, Any]) -> Step:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxcl.bench import jaxcl_config, method_specs
    from jaxcl.host import release_heap
    from jaxcl.models.llama import Decoder
    from jaxcl.objectives.bound import lm_objective
    from jaxcl.recipe import OptimizerSpec
    from jaxcl.train.optim import build_chain
    from jaxcl.train.step import TrainState, make_apply, make_train_step

    cfg = jaxcl_config(spec["preset"], spec["dtype"])
    new_model = lambda: Decoder(cfg, rngs=nnx.Rngs(0))  # noqa: E731
    graphdef, abstract = nnx.split(nnx.eval_shape(new_model), nnx.Param)
    opt = OptimizerSpec(lr=1e-4, warmup_steps=0, schedule="constant", clip_norm=None)
    tx, compiled = build_chain(opt, 1000, method_specs(spec["methods"]))
    objective = lm_objective(make_apply(graphdef))
    step_fn = make_train_step(objective.loss_fn, tx, memory_grads=compiled.needs_memory_grads)
    host = random_batch(cfg.vocab_size, spec["batch"], spec["seq"])
    batch = jax.tree.map(jnp.asarray, host)
    memory = batch if compiled.needs_memory_grads else None
    new_state = lambda p: TrainState(jnp.int32(0), p, tx.init(p))  # noqa: E731
    # Compile from shapes before any array exists, then drop what tracing and lowering cached
    # (the compiled step is all that runs from here) and hand the freed heap back: the step's
    # arrays never sit beside the compiler's working memory.
    started = time.perf_counter()
    like = jax.eval_shape(new_state, nnx.to_pure_dict(abstract))
    step = step_fn.lower(like, batch, {}, memory).compile()
    compile_s = time.perf_counter() - started
    jax.clear_caches()
    gc.collect()
    release_heap()
    _, state = nnx.split(new_model(), nnx.Param)
    holder = {"state": new_state(nnx.to_pure_dict(state))}
    del state

    def run() -> None:
        holder["state"], metrics = step(holder["state"], batch, {}, memory)
        jax.block_until_ready(metrics["loss"])

    def stats() -> tuple[float, str]:
        device = jax.devices()[0]
        if device.platform != "cpu":
            peak = (device.memory_stats() or {}).get("peak_bytes_in_use")
            if peak is not None:
                return peak / 2**30, f"{device.platform} peak bytes in use"
        return peak_rss_gib(), "peak RSS"

    return run, stats, compile_s


def _torch_step(spec: dict[str, Any]) -> Step:
    import contextlib

    import torch
    import transformers

    hf = dict(spec["hf_config"])
    config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    torch.manual_seed(0)
    torch.set_num_threads(spec.get("threads") or os.cpu_count() or 1)
    device = torch.device("cuda" if spec.get("cuda") and torch.cuda.is_available() else "cpu")
    model = transformers.AutoModelForCausalLM.from_config(config).to(device).train()
    model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    host = random_batch(config.vocab_size, spec["batch"], spec["seq"])
    tokens = torch.from_numpy(host["tokens"]).long()
    inputs = tokens[:, :-1].contiguous().to(device)
    labels = tokens[:, 1:].contiguous().to(device)

    def autocast():
        if spec["dtype"] == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    def stats() -> tuple[float, str]:
        if device.type == "cuda":
            return torch.cuda.max_memory_allocated() / 2**30, "cuda max allocated"
        return peak_rss_gib(), "peak RSS"

    return run, stats, 0.0  # eager: nothing compiled ahead


def serve(spec: dict[str, Any], stdin=sys.stdin, stdout=sys.stdout) -> None:
    """Build the step, warm it up, then answer commands (see the module docstring)."""
    build = _torch_step if spec["side"] == "torch" else _jaxcl_step
    started = time.perf_counter()
    run, stats, compile_s = build(spec)
    build_s = time.perf_counter() - started
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    for _ in range(max(spec.get("warmup", 2) - 1, 0)):
        run()
    # jaxcl compiles ahead of the first step: the first step's figure includes its compilation
    ready = {"ready": True, "first_step_s": compile_s + first, "build_s": build_s - compile_s}
    if spec["side"] != "torch":
        import jax

        device = jax.devices()[0]
        ready.update(platform=device.platform, device_kind=device.device_kind)
    _say(stdout, ready)
    for line in stdin:
        command = line.split()
        if not command or command[0] == "quit":
            break
        if command[0] == "run":
            times = []
            for _ in range(int(command[1])):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            _say(stdout, {"times": times})
        elif command[0] == "stats":
            peak, kind = stats()
            _say(stdout, {"peak_gib": peak, "memory_kind": kind})
        else:
            _say(stdout, {"error": f"unknown command {line.strip()!r}"})


def _say(stdout, message: dict[str, Any]) -> None:
    stdout.write(json.dumps(message) + "\n")
    stdout.flush()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    try:
        serve(spec)
    except Exception as err:  # reported to the parent, which names the row
        _say(sys.stdout, {"error": f"{type(err).__name__}: {err}"})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
