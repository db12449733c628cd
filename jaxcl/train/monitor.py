"""What a running stage reports: throughput (tokens/s, step time, MFU), TensorBoard event
files and the progress bar."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import jax
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from jaxcl import parallel
from jaxcl.recipe import StageSpec


@dataclass
class Throughput:
    """Tokens/s, step time and model FLOPs utilisation between two log points.

    Training FLOPs are ``6·N`` per token (forward ``2N``, backward ``4N``; attention's share is
    left out, as in the MFU convention of PaLM/MaxText for short sequences). The first interval
    includes compilation.
    """

    tokens_per_step: int
    flops_per_token: float
    peak_flops: float | None  # of all devices together
    last: float = field(default_factory=time.perf_counter)
    steps: int = 0

    def read(self) -> dict[str, float]:
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        steps, self.steps = max(self.steps, 1), 0
        tokens_per_s = steps * self.tokens_per_step / seconds
        out = {"tokens_per_s": tokens_per_s, "step_seconds": seconds / steps}
        if self.peak_flops:
            out["mfu"] = self.flops_per_token * tokens_per_s / self.peak_flops
        return out


def throughput(ctx, stage: StageSpec, params) -> Throughput:
    pairs = 2 if stage.kind == "align" else 1  # chosen and rejected sequences
    n_params = sum(x.size for x in jax.tree.leaves(params))
    peak = ctx.recipe.peak_flops_per_device
    return Throughput(
        tokens_per_step=stage.batch_size * stage.seq_len * pairs,
        flops_per_token=6.0 * n_params,
        peak_flops=peak * ctx.mesh.size if peak else None,
    )


def event_writer(folder, stage_name: str):
    """TensorBoard event files under ``OUT/tensorboard/<stage>`` (primary process only)."""
    from tensorboardX import SummaryWriter

    if not parallel.is_primary():
        return contextlib.nullcontext()
    return SummaryWriter(str(folder / stage_name), flush_secs=10)


def progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
