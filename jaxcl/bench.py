"""``jaxcl bench``: time the train step of a preset shape, side by side with its variants.

:func:`bench` runs every row in a process of its own (:mod:`jaxcl.bench_worker`), on the same
batch and shape: plain AdamW, AdamW with the continual-learning methods named by ``--method``,
and (``--compare torch``) the transformers + torch AdamW step on the same configuration, in
fp32 and/or bf16 compute (torch: ``autocast``). Each row reports the peak memory of its own
process; step times are medians over the timed steps, taken round-robin across the rows after
warm-up steps that include compilation. MFU is ``6 · parameters · tokens/s / peak``.

:func:`time_jaxcl` and :func:`time_torch` time one step in this process instead.
:func:`boundary_costs` times what a task boundary adds: the per-example Fisher (EWC) and MAS
importance of a preset shape with random weights, in seconds per 1,000 examples.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pydantic
from flax import nnx
from pydantic import TypeAdapter

from jaxcl.bench_worker import random_batch as _worker_batch
from jaxcl.methods.importance import DEFAULT_CHUNK, accumulator, fisher_stat, mas_stat, zeros_f32
from jaxcl.models.config import ModelConfig, preset, to_hf_config
from jaxcl.models.llama import Decoder
from jaxcl.objectives.bound import lm_objective
from jaxcl.recipe import OptimizerSpec
from jaxcl.train.optim import build_chain
from jaxcl.train.step import TrainState, make_apply, make_train_step


@dataclass
class Timing:
    """One row: a train step's median time, first step (compilation included), tokens/s, the
    peak memory of the process that ran it (``memory_kind`` says which measure) and MFU."""

    name: str
    step_seconds: float
    compile_seconds: float
    tokens_per_s: float
    peak_rss_gib: float
    mfu: float | None = None
    dtype: str = "fp32"
    memory_kind: str = "peak RSS"

    @property
    def peak_gib(self) -> float:
        return self.peak_rss_gib

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
    """Token ids uniform in ``[3, vocab)`` (``[batch, seq + 1]``) and an all-ones loss mask."""
    return _worker_batch(cfg.vocab_size, batch, seq, seed)


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


#: Dense bf16 peak FLOP/s of one device, by ``device_kind`` (first match of a lowercase
#: substring): the vendor's figures without sparsity. MFU of both the fp32 and the bf16 rows is
#: taken against it (the usual convention); CPUs have no default (pass ``--peak-flops``).
PEAK_FLOPS: dict[str, float] = {
    "h200": 989e12,
    "h100": 989e12,  # SXM; the PCIe card is 756e12
    "a100": 312e12,
    "l4": 121e12,
    "a10g": 70e12,
    "v6": 918e12,  # TPU v6e (Trillium)
    "v5p": 459e12,
    "v5 lite": 197e12,  # TPU v5e
    "v5e": 197e12,
    "v4": 275e12,
}


def default_peak_flops(device_kind: str) -> float | None:
    """The :data:`PEAK_FLOPS` entry of ``device_kind`` (``jax.devices()[0].device_kind``)."""
    kind = device_kind.lower()
    return next((peak for key, peak in PEAK_FLOPS.items() if key in kind), None)


def jaxcl_config(preset_name: str, dtype: str = "fp32") -> ModelConfig:
    """The preset in ``dtype``: ``"fp32"``, or ``"bf16"`` (bf16 compute, float32 weights, as
    torch's autocast)."""
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"--dtype must be fp32, bf16 or both, got {dtype!r}")
    cfg = preset(preset_name)
    return cfg if dtype == "fp32" else dataclasses.replace(cfg, dtype="bfloat16")


class _Worker:
    """A row's process (:mod:`jaxcl.bench_worker`): started, warmed up, then driven."""

    def __init__(self, label: str, spec: dict[str, Any]) -> None:
        import jaxcl
        from jaxcl.host import allocator_env

        self.label, self.spec, self.times = label, spec, []
        self.stats: dict[str, Any] = {}
        root = str(Path(jaxcl.__file__).resolve().parents[1])
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
        )
        # rows share the accelerator: no process grabs most of its memory up front
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        env = allocator_env(env)  # every row, torch's too: one host allocator for all
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jaxcl.bench_worker", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env=env,
        )
        self.ready = self._answer()

    def _answer(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        answer = json.loads(line) if line.strip() else {"error": "the process ended"}
        if "error" in answer:
            self.stderr.seek(0)
            tail = "".join(self.stderr.readlines()[-15:])
            self.close()
            raise RuntimeError(f"bench row {self.label!r}: {answer['error']}\n{tail}")
        return answer

    def ask(self, command: str) -> dict[str, Any]:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


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
    dtypes: Sequence[str] = ("fp32",),
    threads: int | None = None,
) -> list[Timing]:
    """Every row in a process of its own, on the same batch and shape: for each of ``dtypes``,
    plain AdamW, AdamW with each method, then (``compare_torch``) transformers + torch AdamW
    (bf16: under ``torch.autocast``).

    The rows of one dtype are started one after another (each compiles and warms up alone),
    then timed round-robin, one step of each per round, so a change of machine load hits them
    all alike; at most :data:`MAX_ALIVE` processes are alive at once (:func:`_groups`: each group
    times the plain row beside its others); each reports its own peak memory (peak RSS on CPU,
    the device's peak bytes in use on an accelerator). ``peak_flops`` defaults to the device's
    dense bf16 peak (:data:`PEAK_FLOPS`), none on CPU. torch runs ``threads`` threads
    (default: every core, as XLA's CPU client does)."""
    for dtype in dtypes:
        jaxcl_config(preset_name, dtype)  # bad names fail before any process starts
    method_specs(methods)  # every bad --method fails before any timing
    # this process never touches the accelerator (its memory is the rows'): the first jaxcl
    # row says which device it ran on
    cfg = preset(preset_name)
    n_params = cfg.num_params()
    tokens = batch_size * seq_len
    hf = to_hf_config(cfg).to_diff_dict()
    hf["model_type"] = to_hf_config(cfg).model_type
    hf.pop("transformers_version", None)
    common = {"preset": preset_name, "batch": batch_size, "seq": seq_len, "warmup": warmup}
    timings: list[Timing] = []
    for dtype in dtypes:
        rows = [("jaxcl adamw", {"side": "jaxcl", "methods": []})]
        rows += [
            (f"jaxcl adamw + {m.split(':')[0]}", {"side": "jaxcl", "methods": [m]}) for m in methods
        ]
        if compare_torch:
            rows.append(("transformers+torch adamw", {"side": "torch", "hf_config": hf}))
        times: dict[str, list[float]] = {}
        first: dict[str, _Worker] = {}
        for group in _groups(rows):
            workers: list[_Worker] = []
            try:
                for label, extra in group:
                    if extra["side"] == "torch":
                        platform = workers[0].ready["platform"]
                        extra = dict(extra, threads=threads, cuda=platform == "gpu")
                    workers.append(_Worker(label, {**common, **extra, "dtype": dtype}))
                if peak_flops is None:
                    peak_flops = default_peak_flops(workers[0].ready["device_kind"])
                for _ in range(steps):
                    for w in workers:
                        # let the previous row's idle worker threads (XLA's pool, OpenMP) stop
                        # spinning before this row's step starts: else they take its cores
                        time.sleep(SETTLE_S)
                        w.times += w.ask("run 1")["times"]
                for w in workers:
                    w.stats = w.ask("stats")
                    times.setdefault(w.label, []).extend(w.times)
                    first.setdefault(w.label, w)
            finally:
                for w in workers:
                    w.close()
        for label, _ in rows:
            w, median = first[label], statistics.median(times[label])
            mfu = 6 * n_params * tokens / median / peak_flops if peak_flops else None
            timings.append(
                Timing(
                    label,
                    median,
                    w.ready["first_step_s"],
                    tokens / median,
                    w.stats["peak_gib"],
                    mfu,
                    dtype,
                    w.stats["memory_kind"],
                )
            )
    return timings


#: pause between two rows' steps, seconds (spinning idle threads of the other process settle)
SETTLE_S = 0.5
#: rows alive at once (each holds a model, its optimizer state and compiled step in memory)
MAX_ALIVE = 4


def _groups(rows: list[tuple[str, dict]]) -> list[list[tuple[str, dict]]]:
    """The rows in groups of at most :data:`MAX_ALIVE` processes alive at once, each group led
    by the plain AdamW row (``rows[0]``, timed again in every group and its times pooled), so
    every "vs plain" ratio is taken round-robin against a baseline timed beside it."""
    rest = rows[1:]
    size = MAX_ALIVE - 1
    chunks = [rest[i : i + size] for i in range(0, len(rest), size)] or [[]]
    return [[rows[0], *chunk] for chunk in chunks]


HEADER = ["step", "dtype", "ms/step", "tokens/s", "first step s", "MFU", "vs plain", "vs torch"]


def format_table(timings: list[Timing], title: str, *, memory: bool = False) -> str:
    """The rows as Markdown: ``vs plain`` is the plain jaxcl step's time over the row's (same
    dtype), ``vs torch`` the row's tokens/s over torch's (same dtype); ``memory`` adds each
    row's peak memory (its own process's)."""
    header = HEADER + (["peak memory GiB"] if memory else [])
    lines = [header]
    for t in timings:
        same = [o for o in timings if o.dtype == t.dtype]
        plain = next((o for o in same if o.name == "jaxcl adamw"), None)
        torch = next((o for o in same if o.name.startswith("transformers")), None)
        is_torch = t is torch
        vs_plain = (
            "-" if is_torch or plain is None else f"{plain.step_seconds / t.step_seconds:.2f}x"
        )
        vs_torch = (
            "-" if is_torch or torch is None else f"{t.tokens_per_s / torch.tokens_per_s:.2f}x"
        )
        line = [
            t.name,
            t.dtype,
            f"{t.step_seconds * 1e3:.1f}",
            f"{t.tokens_per_s:,.0f}",
            f"{t.compile_seconds:.1f}",
            "-" if t.mfu is None else f"{t.mfu:.1%}",
            vs_plain,
            vs_torch,
        ]
        if memory:
            line.append(f"{t.peak_rss_gib:.2f} ({t.memory_kind})")
        lines.append(line)
    return _markdown(lines, title)


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
