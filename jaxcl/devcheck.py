"""The one-shot device check behind ``scripts/device_check.sh``: one table for one accelerator.

Rows, each on the same shape and batch (default: the Llama-3.2-1B shape, ``llama-3.2-1b``, random
weights, bf16 compute with float32 parameters and AdamW state, batch 4 × 2048 tokens):

- ``jaxcl adamw``: the jitted train step of :mod:`jaxcl.bench` (:func:`jaxcl.bench.time_jaxcl`);
- ``+ ewc``, ``+ agem``: the same step with EWC's penalty / A-GEM's projection (the overhead of a
  CL method per step, as a ratio to the plain step);
- ``transformers+torch``: ``AutoModelForCausalLM`` of the same config, AdamW, bf16 autocast (on
  CUDA; skipped with a note where torch has no CUDA, run on CPU at the tiny shape);
- ``attention``: the fused kernel that ``attention: auto`` picks (cuDNN on CUDA, splash on TPU;
  splash through the Pallas interpreter on CPU) against XLA's attention on the model's attention
  shape: the largest absolute difference of the outputs and of the q/k/v gradients, and the time
  of one forward + backward of each.

``MFU = 6·N·tokens/s / peak`` (N parameters; attention FLOPs left out, as in ``jaxcl bench`` and
the training log), ``peak`` the device's dense bf16 FLOP/s from :data:`PEAK_BF16` (or
``--peak-flops``). On an accelerator every row runs in its own process, so "peak memory" is that
row's peak device memory (``peak_bytes_in_use``; torch: ``max_memory_allocated``); the CPU
fallback (``--tiny``, or no accelerator) runs every row in this process on the ``test-micro``
preset (batch 2 × 128) and reports the process's peak RSS (a process-wide maximum: it only grows
down the table).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

ROWS = ("plain", "ewc", "agem", "torch", "attention")
LABELS = {
    "plain": "jaxcl adamw",
    "ewc": "jaxcl adamw + ewc",
    "agem": "jaxcl adamw + agem",
    "torch": "transformers+torch adamw",
    "attention": "attention fused vs xla",
}
FULL = {"preset": "llama-3.2-1b", "batch": 4, "seq": 2048, "warmup": 2, "steps": 8}
TINY = {"preset": "test-micro", "batch": 2, "seq": 128, "warmup": 1, "steps": 2}
ROW_TIMEOUT_S = 300
TOTAL_BUDGET_S = 450  # the script must finish within 8 minutes on one GPU

# Dense bf16 peak FLOP/s per chip (vendor data sheets), matched on the lower-cased device kind in
# this order (more specific names first).
PEAK_BF16: tuple[tuple[str, float], ...] = (
    ("h100 pcie", 756e12),
    ("h100 nvl", 835e12),
    ("h100", 989e12),
    ("h200", 989e12),
    ("h800", 989e12),
    ("gh200", 989e12),
    ("b200", 2250e12),
    ("a100", 312e12),
    ("l40s", 362e12),
    ("l4", 121e12),
    ("tpu v4", 275e12),
    ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),
    ("tpu v6 lite", 918e12),
    ("tpu v6e", 918e12),
)


def peak_bf16(device_kind: str) -> float | None:
    """The dense bf16 peak FLOP/s of ``device_kind`` (``jax.devices()[0].device_kind``), or
    ``None`` when unknown (CPUs)."""
    kind = device_kind.lower()
    return next((flops for key, flops in PEAK_BF16 if key in kind), None)


@dataclass
class Row:
    """One line of the table (``None``: not measured; ``note``: why, or what was compared)."""

    row: str
    kernel: str = "-"
    step_ms: float | None = None
    tokens_per_s: float | None = None
    mfu: float | None = None
    memory_gib: float | None = None
    first_s: float | None = None
    compare: str = ""
    device: str = ""
    memory_kind: str = ""


def _memory() -> tuple[float, str]:
    """This process's peak device memory (GiB) where the backend reports it, else peak RSS."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**30, "device"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "RSS"


def _config(preset_name: str):
    from jaxcl.models.config import preset

    return preset(preset_name).replace(dtype="bfloat16", param_dtype="float32")


def _choice(cfg: Any, batch: int, seq: int) -> Any:
    """The :class:`jaxcl.models.attention.Choice` of the model's attention in this process."""
    import jax
    import jax.numpy as jnp

    from jaxcl.models.attention import describe, select_attention

    hd = cfg.resolved_head_dim
    q = jax.ShapeDtypeStruct((batch, seq, cfg.num_heads, hd), jnp.dtype(cfg.dtype))
    k = jax.ShapeDtypeStruct((batch, seq, cfg.num_kv_heads, hd), jnp.dtype(cfg.dtype))
    return select_attention(cfg.attention, describe(q, k, None, cfg.sliding_window))


def _kernel(cfg: Any, batch: int, seq: int) -> str:
    """The attention kernel ``attention: auto`` runs for this shape in this process."""
    return _choice(cfg, batch, seq).impl


def jaxcl_row(name: str, opts: dict[str, Any], peak: float | None) -> Row:
    """The jaxcl train step (plain AdamW, ``+ ewc`` or ``+ agem``) via :mod:`jaxcl.bench`."""
    import jax

    from jaxcl.bench import method_specs, random_batch, time_jaxcl

    cfg = _config(opts["preset"])
    batch = random_batch(cfg, opts["batch"], opts["seq"])
    methods = method_specs([] if name == "plain" else [name])
    timing = time_jaxcl(
        cfg, batch, methods, warmup=opts["warmup"], steps=opts["steps"], peak_flops=peak
    )
    memory, kind = _memory()
    return Row(
        LABELS[name],
        _kernel(cfg, opts["batch"], opts["seq"]),
        timing.step_seconds * 1e3,
        timing.tokens_per_s,
        timing.mfu,
        memory,
        timing.compile_seconds,
        device=jax.devices()[0].device_kind,
        memory_kind=kind,
    )


def torch_row(opts: dict[str, Any], peak: float | None, require_cuda: bool) -> Row:
    """transformers + torch AdamW on the same config and batch, bf16 autocast, fp32 weights."""
    import statistics

    import torch
    import transformers

    from jaxcl.bench import random_batch
    from jaxcl.models.config import to_hf_config

    label = LABELS["torch"]
    cuda = torch.cuda.is_available()
    if require_cuda and not cuda:
        return Row(label, compare="skipped: this torch has no CUDA")
    device = torch.device("cuda" if cuda else "cpu")
    cfg = _config(opts["preset"])
    torch.manual_seed(0)
    with device:  # initialised where it runs
        model = transformers.AutoModelForCausalLM.from_config(to_hf_config(cfg)).train()
    model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.from_numpy(random_batch(cfg, opts["batch"], opts["seq"])["tokens"]).long()
    inputs, labels = tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)
    n_params = sum(p.numel() for p in model.parameters())

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    for _ in range(opts["warmup"] - 1):
        step()
    times = []
    for _ in range(opts["steps"]):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    n_tokens = inputs.numel()
    if cuda:
        memory, kind = torch.cuda.max_memory_allocated() / 2**30, "device"
        name = torch.cuda.get_device_name()
    else:
        memory, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "RSS"
        name = "cpu"
    mfu = 6 * n_params * n_tokens / median / peak if peak else None
    impl = getattr(model.config, "_attn_implementation", "?")
    return Row(label, f"torch {impl}", median * 1e3, n_tokens / median, mfu, memory, first,
               device=name, memory_kind=kind)  # fmt: skip


def attention_row(opts: dict[str, Any]) -> Row:
    """The fused kernel ``auto`` picks (splash off a TPU when nothing is fused: through the
    Pallas interpreter) against XLA on the model's attention shape: output and gradient gaps."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxcl.models import attention as A

    cfg = _config(opts["preset"])
    choice = _choice(cfg, opts["batch"], opts["seq"])
    fused, backend = choice.impl, A.current_backend()
    if fused == "xla":
        if backend != "cpu":
            return Row(LABELS["attention"], "xla", compare=f"no fused kernel: {choice.reason}")
        fused = "splash"  # CPU: the splash kernel through the Pallas interpreter
    b, t, hd = opts["batch"], opts["seq"], cfg.resolved_head_dim
    rng = np.random.default_rng(0)
    shapes = [(b, t, cfg.num_heads, hd), (b, t, cfg.num_kv_heads, hd), (b, t, cfg.num_kv_heads, hd)]
    q, k, v = (jnp.asarray(rng.normal(size=s), jnp.bfloat16) for s in shapes)
    cot = jnp.asarray(rng.normal(size=shapes[0]), jnp.bfloat16)
    window = cfg.sliding_window

    def run(impl: str):
        if impl == "splash":
            f = lambda q, k, v: A.splash_attention(q, k, v, window=window)  # noqa: E731
        elif impl == "cudnn":
            f = lambda q, k, v: A.causal_attention(q, k, v, window=window, impl="cudnn")  # noqa: E731
        else:
            f = lambda q, k, v: A.xla_attention(q, k, v, window=window)  # noqa: E731

        def fwd_bwd(q, k, v, cot):
            out, vjp = jax.vjp(f, q, k, v)
            return (out, *vjp(cot))

        fn = jax.jit(fwd_bwd)
        jax.block_until_ready(fn(q, k, v, cot))
        start = time.perf_counter()
        res = jax.block_until_ready(fn(q, k, v, cot))
        return [np.asarray(x, np.float32) for x in res], time.perf_counter() - start

    (ref, ref_s), (got, got_s) = run("xla"), run(fused)
    gaps = [float(np.abs(a - r).max()) for a, r in zip(got, ref)]
    scale = max(float(np.abs(ref[0]).max()), 1e-30)
    where = " (Pallas interpreter)" if backend == "cpu" else ""
    compare = (
        f"max abs diff: out {gaps[0]:.1e} (max abs out {scale:.2f}), dq {gaps[1]:.1e}, "
        f"dk {gaps[2]:.1e}, dv {gaps[3]:.1e}; fwd+bwd {got_s * 1e3:.1f} ms vs xla "
        f"{ref_s * 1e3:.1f} ms"
    )
    return Row(f"attention {fused}{where} vs xla", f"{fused} / xla", compare=compare,
               device=jax.devices()[0].device_kind)  # fmt: skip


def run_row(name: str, opts: dict[str, Any], peak: float | None, tiny: bool) -> Row:
    """One row in this process (errors become the row's note)."""
    try:
        if name in ("plain", "ewc", "agem"):
            return jaxcl_row(name, opts, peak)
        if name == "torch":
            return torch_row(opts, peak, require_cuda=not tiny)
        return attention_row(opts)
    except Exception as err:  # noqa: BLE001  (one failed row must not hide the others)
        first = (str(err).strip().splitlines() or [""])[0][:200]
        return Row(LABELS[name], compare=f"failed: {type(err).__name__}: {first}")


def _row_in_subprocess(name: str, opts: dict[str, Any], peak: float | None, timeout: float) -> Row:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row.json")
        cmd = [sys.executable, "-m", "jaxcl.devcheck", "--row", name, "--json-out", out]
        cmd += [f"--{k}={v}" for k, v in opts.items()]
        cmd += [] if peak is None else [f"--peak-flops={peak}"]
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this jaxcl first
        path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, PYTHONPATH=path)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return Row(LABELS[name], compare=f"failed: timed out after {timeout:.0f} s")
        if not os.path.exists(out):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return Row(LABELS[name], compare=f"failed (exit {proc.returncode}): {tail[0][:200]}")
        with open(out) as f:
            return Row(**json.load(f))


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


HEADER = ["row", "attention", "ms/step", "tokens/s", "MFU", "peak mem GiB", "first step s",
          "compare"]  # fmt: skip


def format_table(rows: list[Row], title: str) -> str:
    """``title`` and the Markdown table; ``compare`` holds each CL row's step-time ratio to the
    plain step, torch's ratio and jaxcl's speed-up over it, and the attention agreement."""
    plain = next((r for r in rows if r.row == "jaxcl adamw" and r.step_ms), None)
    lines = []
    for r in rows:
        compare = r.compare
        if plain is not None and r.step_ms and not compare:
            ratio = r.step_ms / plain.step_ms
            if r is plain:
                compare = "1.00× (baseline)"
            elif r.row.startswith("transformers"):
                compare = f"torch step {ratio:.2f}× jaxcl's: jaxcl {ratio:.2f}× torch's tokens/s"
            else:
                compare = f"{ratio:.2f}× the plain step"
        mem = _fmt(r.memory_gib, ".2f") + (f" ({r.memory_kind})" if r.memory_kind else "")
        lines.append([r.row, r.kernel, _fmt(r.step_ms, ".1f"), _fmt(r.tokens_per_s, ",.0f"),
                      _fmt(r.mfu, ".1%"), mem, _fmt(r.first_s, ".1f"), compare])  # fmt: skip
    table = [HEADER] + lines
    widths = [max(len(r[c]) for r in table) for c in range(len(HEADER))]
    out = [title, ""]
    for i, r in enumerate(table):
        out.append("| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |")
        if i == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def _probe() -> tuple[str, str]:
    """(backend, device kind) from a child process, so that this process holds no accelerator
    memory while the rows run."""
    code = "import jax; print(jax.default_backend()); print(jax.devices()[0].device_kind)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = proc.stdout.strip().splitlines()
    return (lines[0], lines[1]) if len(lines) >= 2 else ("cpu", "cpu")


def device_check(
    *, tiny: bool | None = None, rows: tuple[str, ...] = ROWS, peak_flops: float | None = None,
    **overrides: Any,
) -> tuple[list[Row], str]:  # fmt: skip
    """Every row and the table. ``tiny=None``: the full shape on an accelerator (each row in its
    own process), the tiny CPU fallback (in this process) when there is none."""
    start = time.perf_counter()
    if tiny:
        import jax

        backend, kind = jax.default_backend(), jax.devices()[0].device_kind
    else:
        backend, kind = _probe()
        tiny = backend == "cpu" if tiny is None else tiny
    opts = {**(TINY if tiny else FULL), **{k: v for k, v in overrides.items() if v is not None}}
    peak = peak_flops or peak_bf16(kind)
    results = []
    for name in rows:
        left = TOTAL_BUDGET_S - (time.perf_counter() - start)
        if not tiny and left < 30:
            results.append(Row(LABELS[name], compare="skipped: the 8-minute budget is spent"))
            continue
        if tiny:
            results.append(run_row(name, opts, peak, tiny=True))
        else:
            results.append(_row_in_subprocess(name, opts, peak, min(ROW_TIMEOUT_S, left)))
    peak_text = f"{peak / 1e12:,.0f} TFLOP/s bf16" if peak else "unknown (MFU not computed)"
    title = (
        f"jaxcl device check ({'tiny CPU fallback' if tiny else 'full'}): {kind} ({backend}), "
        f"preset {opts['preset']}, batch {opts['batch']} × seq {opts['seq']}, bf16 compute with "
        f"fp32 parameters and AdamW state, median of {opts['steps']} steps; peak {peak_text}; "
        f"{time.perf_counter() - start:.0f} s"
    )
    return results, format_table(results, title)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jaxcl.devcheck", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--tiny", action="store_true", help="the CPU fallback shape, in-process")
    parser.add_argument("--preset", help=f"model shape (default {FULL['preset']})")
    parser.add_argument("--batch", type=int, help=f"sequences per step (default {FULL['batch']})")
    parser.add_argument("--seq", type=int, help=f"tokens per sequence (default {FULL['seq']})")
    parser.add_argument("--steps", type=int, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, help="untimed steps, compilation included")
    parser.add_argument("--peak-flops", type=float, help="device peak FLOP/s (else from the table)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"subset of {','.join(ROWS)}")
    parser.add_argument("--row", choices=ROWS, help=argparse.SUPPRESS)  # one row, for the parent
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    opts = {k: getattr(args, k) for k in ("preset", "batch", "seq", "steps", "warmup")}
    if args.row:
        row = run_row(args.row, opts, args.peak_flops, tiny=False)
        with open(args.json_out, "w") as f:
            json.dump(asdict(row), f)
        return 0
    rows = tuple(r for r in args.rows.split(",") if r)
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"--rows: unknown {unknown}; valid: {', '.join(ROWS)}")
    _, table = device_check(tiny=args.tiny or None, rows=rows, peak_flops=args.peak_flops, **opts)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
