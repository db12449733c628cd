"""``jaxcl bench``: time the train step of a preset shape, side by side with its variants.

Everything compared is measured in the same process on the same batch: plain AdamW, AdamW with
the continual-learning methods named by ``--method``, and (``--compare torch``) the transformers
+ torch AdamW step on the same configuration. Step times are medians over the timed steps,
after warm-up steps that include compilation.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pydantic
from flax import nnx
from pydantic import TypeAdapter

from jaxcl.models.config import ModelConfig, preset, to_hf_config
from jaxcl.models.llama import Decoder
from jaxcl.objectives.bound import lm_objective
from jaxcl.recipe import OptimizerSpec
from jaxcl.train.optim import build_chain
from jaxcl.train.step import TrainState, make_apply, make_train_step


@dataclass
class Timing:
    name: str
    step_seconds: float
    compile_seconds: float
    tokens_per_s: float
    peak_rss_gib: float
    mfu: float | None = None

    def row(self, baseline: Timing | None) -> list[str]:
        ratio = f"{baseline.step_seconds / self.step_seconds:.2f}x" if baseline else "-"
        return [
            self.name,
            f"{self.step_seconds * 1e3:.1f}",
            f"{self.tokens_per_s:,.0f}",
            f"{self.compile_seconds:.1f}",
            f"{self.peak_rss_gib:.2f}",
            "-" if self.mfu is None else f"{self.mfu:.1%}",
            ratio,
        ]


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _time_steps(run_step: Callable[[], Any], warmup: int, steps: int) -> tuple[float, float]:
    """(compile+first-step seconds, median step seconds); ``run_step`` blocks until done."""
    start = time.perf_counter()
    run_step()
    first = time.perf_counter() - start
    for _ in range(max(warmup - 1, 0)):
        run_step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run_step()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def random_batch(cfg: ModelConfig, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "tokens": rng.integers(3, cfg.vocab_size, size=(batch, seq + 1)).astype(np.int32),
        "loss_mask": np.ones((batch, seq + 1), np.float32),
    }


def method_specs(names: Sequence[str]) -> list[Any]:
    """Recipe method entries from ``NAME`` or ``NAME:key=value,key=value`` (values parsed as
    YAML), e.g. ``["ewc", "agem", "freeze:include=embed"]``; other arguments take defaults."""
    import yaml

    from jaxcl.methods.specs import MethodSpec

    adapter = TypeAdapter(MethodSpec)
    specs = []
    for text in names:
        name, _, args = text.partition(":")
        entry: dict[str, Any] = {"name": name}
        for pair in filter(None, args.split(",")):
            key, _, value = pair.partition("=")
            entry[key] = yaml.safe_load(value)
        try:
            specs.append(adapter.validate_python(entry))
        except pydantic.ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'][1:])) or 'name'}: {e['msg']}" for e in err.errors()
            )
            raise ValueError(f"--method {text!r}: {problems}") from None
    return specs


def time_jaxcl(
    cfg: ModelConfig,
    batch: dict[str, np.ndarray],
    methods: Sequence[Any] = (),
    *,
    warmup: int = 2,
    steps: int = 5,
    peak_flops: float | None = None,
) -> Timing:
    """Time one jitted AdamW step (plus ``methods``, recipe method entries) of ``cfg`` on
    ``batch``."""
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    del model, state
    spec = OptimizerSpec(lr=1e-4, warmup_steps=0, schedule="constant", clip_norm=None)
    tx, compiled = build_chain(spec, 1000, methods)
    objective = lm_objective(make_apply(graphdef))
    step_fn = make_train_step(objective.loss_fn, tx, memory_grads=compiled.needs_memory_grads)
    device_batch = jax.tree.map(jnp.asarray, batch)
    memory = device_batch if compiled.needs_memory_grads else None
    holder = {"state": TrainState(jnp.int32(0), params, tx.init(params))}

    def run():
        holder["state"], metrics = step_fn(holder["state"], device_batch, {}, memory)
        jax.block_until_ready(metrics["loss"])

    first, median = _time_steps(run, warmup, steps)
    tokens = batch["tokens"].shape[0] * (batch["tokens"].shape[1] - 1)
    n_params = sum(x.size for x in jax.tree.leaves(holder["state"].params))
    mfu = 6 * n_params * tokens / median / peak_flops if peak_flops else None
    label = "jaxcl adamw" + "".join(f" + {m.name}" for m in methods)
    return Timing(label, median, first, tokens / median, _peak_rss_gib(), mfu)


def time_torch(
    cfg: ModelConfig, batch: dict[str, np.ndarray], *, warmup: int = 2, steps: int = 5
) -> Timing:
    """Time the transformers + torch AdamW step on the same configuration and batch (fp32)."""
    import torch
    import transformers

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    hf_config = to_hf_config(cfg)
    model = transformers.AutoModelForCausalLM.from_config(hf_config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.from_numpy(batch["tokens"]).long()
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def run():
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        loss.backward()
        optimizer.step()

    first, median = _time_steps(run, warmup, steps)
    n_tokens = inputs.numel()
    return Timing("transformers+torch adamw", median, first, n_tokens / median, _peak_rss_gib())


def bench(
    preset_name: str,
    *,
    batch_size: int,
    seq_len: int,
    methods: Sequence[str] = (),
    compare_torch: bool = False,
    warmup: int = 2,
    steps: int = 5,
    peak_flops: float | None = None,
) -> list[Timing]:
    """Plain AdamW first, then each method, then torch: every figure from this one process."""
    cfg = preset(preset_name)
    specs = method_specs(methods)  # every bad --method fails before any timing
    batch = random_batch(cfg, batch_size, seq_len)
    timings = [time_jaxcl(cfg, batch, (), warmup=warmup, steps=steps, peak_flops=peak_flops)]
    for spec in specs:
        timings.append(
            time_jaxcl(cfg, batch, (spec,), warmup=warmup, steps=steps, peak_flops=peak_flops)
        )
    if compare_torch:
        timings.append(time_torch(cfg, batch, warmup=warmup, steps=steps))
    return timings


HEADER = ["step", "ms/step", "tokens/s", "first step s", "peak RSS GiB", "MFU", "speed vs first"]


def format_table(timings: list[Timing], title: str) -> str:
    rows = [HEADER] + [t.row(timings[0] if i else None) for i, t in enumerate(timings)]
    widths = [max(len(r[c]) for r in rows) for c in range(len(HEADER))]
    lines = [title, ""]
    for i, r in enumerate(rows):
        lines.append("| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |")
        if i == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
