"""``jaxcl bench``: time the train step of a preset shape, side by side with its variants.

Everything compared is measured in the same process on the same batch: plain AdamW, AdamW with
the continual-learning methods named by ``--method``, and (``--compare torch``) the transformers
+ torch AdamW step on the same configuration. Step times are medians over the timed steps,
after warm-up steps that include compilation.

:func:`boundary_costs` times what a task boundary adds instead: the per-example Fisher (EWC) and
MAS importance of a preset shape with random weights, in seconds per 1,000 examples.
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

from jaxcl.methods.importance import DEFAULT_CHUNK, accumulator, fisher_stat, mas_stat, zeros_f32
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


@dataclass
class _Variant:
    """A compiled jaxcl train step ready to time: ``run()`` blocks until the step is done."""

    label: str
    run: Callable[[], None]
    n_params: int
    tokens: int
    first: float = 0.0
    times: list[float] | None = None

    def timing(self, peak_flops: float | None) -> Timing:
        median = statistics.median(self.times or [float("nan")])
        mfu = 6 * self.n_params * self.tokens / median / peak_flops if peak_flops else None
        return Timing(self.label, median, self.first, self.tokens / median, _peak_rss_gib(), mfu)


def _variant(cfg: ModelConfig, batch: dict[str, np.ndarray], methods: Sequence[Any]) -> _Variant:
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    del model, state
    spec = OptimizerSpec(lr=1e-4, warmup_steps=0, schedule="constant", clip_norm=None)
    tx, compiled = build_chain(spec, 1000, list(methods))
    objective = lm_objective(make_apply(graphdef))
    step_fn = make_train_step(objective.loss_fn, tx, memory_grads=compiled.needs_memory_grads)
    device_batch = jax.tree.map(jnp.asarray, batch)
    memory = device_batch if compiled.needs_memory_grads else None
    holder = {"state": TrainState(jnp.int32(0), params, tx.init(params))}

    def run() -> None:
        holder["state"], metrics = step_fn(holder["state"], device_batch, {}, memory)
        jax.block_until_ready(metrics["loss"])

    tokens = batch["tokens"].shape[0] * (batch["tokens"].shape[1] - 1)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    label = "jaxcl adamw" + "".join(f" + {m.name}" for m in methods)
    return _Variant(label, run, n_params, tokens)


def _time_interleaved(variants: Sequence[_Variant], warmup: int, steps: int) -> None:
    """Warm every variant up (compilation in its first step), then time them round-robin, one
    step of each per round, so a change of machine load hits them all alike."""
    for v in variants:
        start = time.perf_counter()
        v.run()
        v.first = time.perf_counter() - start
        for _ in range(max(warmup - 1, 0)):
            v.run()
        v.times = []
    for _ in range(steps):
        for v in variants:
            start = time.perf_counter()
            v.run()
            v.times.append(time.perf_counter() - start)


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
    variant = _variant(cfg, batch, methods)
    _time_interleaved([variant], warmup, steps)
    return variant.timing(peak_flops)


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
    """Plain AdamW first, then each method, then torch: every figure from this one process.

    The jaxcl variants are compiled first and then timed round-robin (one step of each per
    round), so their ratios hold on a machine whose load changes during the run; all of them
    are held in memory at once."""
    cfg = preset(preset_name)
    specs = method_specs(methods)  # every bad --method fails before any timing
    batch = random_batch(cfg, batch_size, seq_len)
    variants = [_variant(cfg, batch, ())] + [_variant(cfg, batch, (spec,)) for spec in specs]
    _time_interleaved(variants, warmup, steps)
    timings = [v.timing(peak_flops) for v in variants]
    if compare_torch:
        timings.append(time_torch(cfg, batch, warmup=warmup, steps=steps))
    return timings


HEADER = ["step", "ms/step", "tokens/s", "first step s", "peak RSS GiB", "MFU", "speed vs first"]


def format_table(timings: list[Timing], title: str) -> str:
    rows = [HEADER] + [t.row(timings[0] if i else None) for i, t in enumerate(timings)]
    return _markdown(rows, title)


def _markdown(rows: list[list[str]], title: str) -> str:
    """``title``, a blank line and ``rows`` (the first is the header) as a Markdown table."""
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = [title, ""]
    for i, r in enumerate(rows):
        lines.append("| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |")
        if i == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- task boundaries


@dataclass
class BoundaryTiming:
    """One importance estimate of a preset shape: ``seconds_per_1000`` examples once compiled,
    and the first batch's seconds (compilation included, paid once per boundary and batch
    shape)."""

    name: str
    n_params: int
    examples: int
    seq_len: int
    chunk: int
    seconds_per_1000: float
    first_batch_seconds: float

    def row(self) -> list[str]:
        return [
            self.name,
            f"{self.n_params / 1e6:,.1f}M",
            f"{self.examples}",
            f"{self.seq_len}",
            f"{self.chunk}",
            f"{self.seconds_per_1000:,.1f}",
            f"{self.first_batch_seconds:.1f}",
        ]


BOUNDARY_HEADER = [
    "estimate",
    "parameters",
    "examples timed",
    "seq",
    "chunk",
    "s / 1,000 examples",
    "first batch s",
]


def time_boundary(
    preset_name: str,
    kind: str = "fisher",
    *,
    examples: int = 16,
    batch_size: int = 8,
    seq_len: int = 64,
    chunk: int = DEFAULT_CHUNK,
    per_example: bool = True,
) -> BoundaryTiming:
    """Time ``kind`` (``"fisher"``: :func:`jaxcl.methods.fisher_diagonal` of the LM loss;
    ``"mas"``: :func:`jaxcl.methods.mas_importance` of the logits) on the preset's shape with
    random weights: one untimed batch (compilation), then ``examples`` (whole batches) timed."""
    if kind not in ("fisher", "mas"):
        raise ValueError(f"boundary estimate must be fisher or mas, got {kind!r}")
    cfg = preset(preset_name)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    del model, state
    apply = make_apply(graphdef)
    if kind == "fisher":
        stat = fisher_stat(lm_objective(apply).scalar({}))
    else:
        stat = mas_stat(lambda p, batch: apply(p, batch["tokens"][:, :-1]))
    accumulate = accumulator(stat, per_example, chunk, kind)
    n_batches = max(1, -(-examples // batch_size))
    batches = [
        jax.tree.map(jnp.asarray, random_batch(cfg, batch_size, seq_len, seed=i))
        for i in range(n_batches + 1)
    ]
    start = time.perf_counter()
    total = jax.block_until_ready(accumulate(zeros_f32(params), params, batches[0]))
    first = time.perf_counter() - start
    start = time.perf_counter()
    for batch in batches[1:]:
        total = accumulate(total, params, batch)
    jax.block_until_ready(total)
    elapsed = time.perf_counter() - start
    timed = n_batches * batch_size
    n_params = sum(x.size for x in jax.tree.leaves(params))
    label = f"{preset_name} {kind}" + ("" if per_example else " (batch-level)")
    return BoundaryTiming(label, n_params, timed, seq_len, chunk, elapsed / timed * 1000, first)


def boundary_costs(
    presets: Sequence[str] = ("tiny", "smollm2-135m"),
    kinds: Sequence[str] = ("fisher",),
    **kwargs: Any,
) -> list[BoundaryTiming]:
    """:func:`time_boundary` for every preset and estimate, in this one process."""
    return [time_boundary(p, k, **kwargs) for p in presets for k in kinds]


def format_boundary(timings: list[BoundaryTiming], title: str) -> str:
    return _markdown([BOUNDARY_HEADER] + [t.row() for t in timings], title)
