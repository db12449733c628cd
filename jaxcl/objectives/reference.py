"""The reference policy of preference objectives, and checks on preference rows.

* A reference may come from a named earlier checkpoint: :func:`checkpoint_problem` says why a
  path is not one (used at recipe validation, so a missing checkpoint fails before training),
  :func:`resolve_checkpoint` finds its step folder; the trainer restores it as a plain model
  (``RunContext.restore_model``: a LoRA stage's adapters folded in) shaped like the policy.
* Reference log-probs can be precomputed once per dataset pass and cached in the examples:
  :func:`annotate_reference_logps` adds ``ref_chosen_logps`` / ``ref_rejected_logps`` (summed
  response log-probs under the reference, float32 scalars) to encoded preference examples; the
  DPO term then reads them from the batch and the step never holds the reference tree.
* :func:`check_preference_example` / :func:`check_preference_source` refuse a preference row
  missing ``chosen`` or ``rejected`` (or with a non-string one) and a row whose chosen and
  rejected texts are identical (after stripping whitespace), naming the file and line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl.objectives.chunked import DEFAULT_CHUNK, sequence_logps_chunked
from jaxcl.objectives.lm import sequence_logps
from jaxcl.objectives.terms import REF_KEYS

# ----------------------------------------------------------------------------- checkpoints


def _is_step_dir(path: Path) -> bool:
    return path.is_dir() and path.name.isdigit() and (path / "manifest").is_dir()


def checkpoint_problem(path: str) -> str | None:
    """Why ``path`` is not a usable checkpoint (``None`` if it is).

    A checkpoint is a step folder ``OUT/checkpoints/<stage>/<step>`` (holding ``params`` and
    ``manifest``) or a stage folder ``OUT/checkpoints/<stage>`` (its latest step is used).
    """
    p = Path(path).expanduser()
    if not p.exists():
        return f"no checkpoint at {path!r}: the path does not exist"
    if _is_step_dir(p):
        return None if (p / "params").is_dir() else f"{path!r} holds no params"
    if p.is_dir() and any(_is_step_dir(c) for c in p.iterdir()):
        return None
    return (
        f"{path!r} is not a jaxcl checkpoint: expected a step folder such as "
        "runs/NAME/checkpoints/STAGE/STEP (with params/ and manifest/) or a stage folder "
        "holding such steps"
    )


def resolve_checkpoint(path: str) -> tuple[Path, int]:
    """``(stage_dir, step)`` of a step folder, or of the latest step of a stage folder."""
    problem = checkpoint_problem(path)
    if problem:
        raise FileNotFoundError(problem)
    p = Path(path).expanduser()
    if _is_step_dir(p):
        return p.parent, int(p.name)
    return p, max(int(c.name) for c in p.iterdir() if _is_step_dir(c))


# ----------------------------------------------------------------------------- precomputed


def make_pair_logps_fn(apply: Callable[..., jax.Array], chunk: int = DEFAULT_CHUNK):
    """Jitted ``(params, batch) -> (chosen_logps [B], rejected_logps [B])``, summed over the
    response (target) tokens, as the DPO term computes them (logits ``chunk`` positions at a
    time when ``apply`` allows it: :mod:`jaxcl.objectives.chunked`)."""

    @jax.jit
    def pair_logps(params, batch):
        out = []
        for side in ("chosen", "rejected"):
            tokens, mask = batch[f"{side}_tokens"], batch[f"{side}_mask"]
            out.append(
                sequence_logps_chunked(
                    apply, params, tokens[:, :-1], tokens[:, 1:], mask[:, 1:], chunk
                )
            )
        return tuple(out)

    return pair_logps


def annotate_reference_logps(
    pair_logps,
    ref_params: Any,
    encoded: Sequence[dict[str, np.ndarray]],
    *,
    batch_size: int,
    put_batch: Callable[[dict[str, np.ndarray]], dict[str, Any]] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Copies of encoded preference ``encoded`` with the reference's summed response log-probs
    under :data:`~jaxcl.objectives.terms.REF_KEYS` (one pass over the data, whole batches; the
    last is padded by repeating its final example).

    ``pair_logps`` comes from :func:`make_pair_logps_fn`; ``put_batch`` places a batch on the
    mesh (default: as is).
    """
    encoded = list(encoded)
    if not encoded:
        return []
    n = len(encoded)
    padded = encoded + [encoded[-1]] * ((-n) % batch_size)
    chosen, rejected = [], []
    keys = ("chosen_tokens", "chosen_mask", "rejected_tokens", "rejected_mask")
    for start in range(0, len(padded), batch_size):
        rows = padded[start : start + batch_size]
        batch = {k: np.stack([r[k] for r in rows]) for k in keys}
        if put_batch is not None:
            batch = put_batch(batch)
        c, r = jax.device_get(pair_logps(ref_params, batch))
        chosen.append(np.asarray(c, np.float32)), rejected.append(np.asarray(r, np.float32))
    c_all, r_all = np.concatenate(chosen)[:n], np.concatenate(rejected)[:n]
    return [
        {**ex, REF_KEYS[0]: np.float32(c_all[i]), REF_KEYS[1]: np.float32(r_all[i])}
        for i, ex in enumerate(encoded)
    ]


def reference_logps_reference(apply, ref_params, example: dict[str, np.ndarray]):
    """The reference log-probs of one encoded example (a slow oracle for tests)."""
    out = []
    for side in ("chosen", "rejected"):
        tokens = jnp.asarray(example[f"{side}_tokens"])[None]
        mask = jnp.asarray(example[f"{side}_mask"])[None]
        logits = apply(ref_params, tokens[:, :-1])
        out.append(float(sequence_logps(logits, tokens[:, 1:], mask[:, 1:])[0]))
    return tuple(out)


# ----------------------------------------------------------------------------- row checks


def check_preference_example(example: Any, where: str = "preference row") -> dict[str, str]:
    """``example`` if it is a usable preference row, else ``ValueError`` naming ``where``.

    A row needs string ``chosen`` and ``rejected`` fields (``prompt`` may be empty) whose texts
    differ after stripping whitespace: identical texts carry no preference and make every
    pairwise loss constant.
    """
    if not isinstance(example, dict):
        raise ValueError(f"{where}: a preference row must be an object, got {type(example)}")
    for field in ("chosen", "rejected"):
        if field not in example or example[field] is None:
            have = sorted(example)
            raise ValueError(f"{where}: field {field!r} is missing; the row has {have}")
        if not isinstance(example[field], str):
            raise ValueError(
                f"{where}: field {field!r} must be a string, got {type(example[field]).__name__}"
            )
    if example["chosen"].strip() == example["rejected"].strip():
        raise ValueError(
            f"{where}: chosen and rejected are identical ({example['chosen'].strip()[:60]!r}); "
            "a preference pair needs two different responses"
        )
    return example


def check_preference_source(source: Any, *, limit: int = 20) -> None:
    """Check every row of a preference ``ExampleSource`` (anything with ``len``, ``[i]`` and
    ``where(i)``); raises one ``ValueError`` listing up to ``limit`` bad rows with file and
    line."""
    problems = []
    for i in range(len(source)):
        where = source.where(i)
        try:
            check_preference_example(source[i], where)
        except ValueError as err:
            problems.append(str(err))
            if len(problems) >= limit:
                problems.append("... (further rows not checked)")
                break
    if problems:
        raise ValueError(f"{len(problems)} bad preference row(s):\n  " + "\n  ".join(problems))
