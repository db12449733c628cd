"""Self-synthesized rehearsal (SSR; Huang et al., ACL 2024): a finished task's rehearsal data,
written by the models themselves.

SSR keeps no real example of a finished task for rehearsal. At the task's end:

1. **Instance synthesis.** The *base* model (the one continual training started from) is prompted
   in context with a few demonstrations of the task, in the reference code's format
   (``custom/icl_gen/complete_param_nic010_cate.py``)::

       {definition}\\n\\n                      (when the task has one)
       Input: {x_1}\\nOutput: {y_1}\\n\\n
       Input: {x_2}\\nOutput: {y_2}\\n\\n
       Input:

   one prompt per ordered tuple of ``shots`` distinct demonstrations from a small pool (the
   reference: every ordered pair of a 1 % sample, 20 rows), each sampled ``samples`` times
   (top-p 0.6, temperature 0.9). Every ``Input: … Output:`` the base model writes yields a
   synthetic input ``x̂`` (:func:`parse_inputs`); its ``ŷ`` is discarded.
2. **Instance selection.** The inputs are embedded, L2-normalised and clustered by K-means
   (20 clusters); each cluster ``c`` of ``n_c`` of the ``N`` inputs gives its
   ``round(keep · n_c / N)`` inputs nearest to its centroid (``custom/icl_gen/kmeans_self.py``:
   :func:`cluster_select`).
3. **Output refinement.** The *latest* model (the one that just finished the task) answers each
   kept input greedily (``custom/icl_gen/label_param.py``): ``ȳ = f_θ(t)(x̂)``. The pairs
   ``(x̂, ȳ)`` are the task's rehearsal data, mixed into every later task's training.

Selection looks at the inputs only, so selecting before refining (the reference scripts' order)
keeps the same instances as refining first (the paper's figure) and refines only those kept.
:func:`synthesize` runs the three steps over two callables (the base and the latest model);
the recipe method is :class:`jaxcl.methods.ssr.SsrSpec`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from jaxcl.data.replay import instruction_vector

#: the reference code's demonstration markers
MARKERS: tuple[str, str] = ("Input:", "Output:")


def icl_prompt(
    demos: Sequence[tuple[str, str]],
    *,
    definition: str = "",
    markers: tuple[str, str] = MARKERS,
) -> str:
    """The in-context prompt for new inputs: ``definition`` (if any) and a blank line, each
    demonstration ``(x, y)`` as ``"Input: x\\nOutput: y\\n\\n"``, then an open ``"Input:"``."""
    inp, out = markers
    head = f"{definition}\n\n" if definition else ""
    return head + "".join(f"{inp} {x}\n{out} {y}\n\n" for x, y in demos) + inp


def _unrank(index: int, n: int, k: int) -> tuple[int, ...]:
    """The ``index``-th (0-based, lexicographic) ordered ``k``-tuple of distinct items of
    ``range(n)``, as ``itertools.permutations(range(n), k)`` lists them."""
    left, out = list(range(n)), []
    for j in range(k):
        block = math.perm(n - j - 1, k - j - 1)
        digit, index = divmod(index, block)
        out.append(left.pop(digit))
    return tuple(out)


def demonstration_sets(
    pool: int, shots: int, *, limit: int | None = None, seed: int = 0
) -> list[tuple[int, ...]]:
    """Which demonstrations head each prompt: ordered ``shots``-tuples of distinct indices into
    a pool of ``pool`` rows, in lexicographic order. All of them (the reference's ``times()``:
    ``pool · (pool − 1)`` pairs) unless ``limit`` is given: then a seeded uniform sample of
    ``limit`` of them, still in lexicographic order."""
    if pool < shots or shots < 1:
        return []
    total = math.perm(pool, shots)
    if limit is None or limit >= total:
        ranks = range(total)
    else:
        ranks = np.sort(np.random.default_rng(seed).choice(total, size=limit, replace=False))
    return [_unrank(int(r), pool, shots) for r in ranks]


def parse_inputs(text: str, *, markers: tuple[str, str] = MARKERS, nested: int = 0) -> list[str]:
    """The synthetic inputs in a continuation of :func:`icl_prompt` (which ended with an open
    input marker).

    The continuation is cut into instances at the format's own separator ``"\\n\\nInput:"``; an
    instance counts when it holds the output marker ``"\\nOutput:"`` exactly ``nested + 1``
    times (``nested``: how often the task's own inputs contain it), and its input is what
    precedes the last one, less the format's single leading space. Instances without an output
    marker (cut off, or not in the format) and blank inputs are dropped."""
    inp, out = markers
    sep = "\n" + out
    found = []
    for piece in text.split("\n\n" + inp):
        if piece.count(sep) != nested + 1:
            continue
        x = piece[: piece.rfind(sep)]
        x = x[1:] if x.startswith(" ") else x
        if x.strip():
            found.append(x)
    return found


def hashed_embedding(texts: Sequence[str]) -> np.ndarray:
    """``[n, 512]`` L2-normalised hashed bag-of-words vectors, one per text (the stand-in for
    the reference's SimCSE sentence embeddings)."""
    return np.stack([instruction_vector([t]) for t in texts]) if texts else np.zeros((0, 512))


def _sq_dist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``[n, k]`` squared Euclidean distances, ``‖x‖² − 2 x·c + ‖c‖²`` clipped at 0."""
    d2 = (x * x).sum(1)[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None]
    return np.maximum(d2, 0.0)


def kmeans_init(x: np.ndarray, k: int, *, seed: int = 0) -> np.ndarray:
    """k-means++ seeding (Arthur and Vassilvitskii, 2007): the first centre uniformly, each next
    one drawn with probability proportional to the squared distance to the nearest centre."""
    x = np.asarray(x, np.float64)
    rng = np.random.default_rng(seed)
    centers = [x[int(rng.integers(len(x)))]]
    d2 = _sq_dist(x, centers[0][None])[:, 0]
    for _ in range(1, k):
        total = d2.sum()
        pick = int(rng.choice(len(x), p=d2 / total)) if total > 0 else int(rng.integers(len(x)))
        centers.append(x[pick])
        d2 = np.minimum(d2, _sq_dist(x, x[pick][None])[:, 0])
    return np.asarray(centers, np.float64)


def kmeans(
    x: np.ndarray, k: int, *, seed: int = 0, init: np.ndarray | None = None, max_iter: int = 300
) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's K-means from ``init`` (default :func:`kmeans_init`) until no label changes:
    ``(centres [k, d], labels [n])``. An emptied cluster keeps its previous centre."""
    x = np.asarray(x, np.float64)
    centers = kmeans_init(x, k, seed=seed) if init is None else np.array(init, np.float64)
    labels = None
    for _ in range(max_iter):
        new = _sq_dist(x, centers).argmin(1)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        for c in range(len(centers)):
            members = x[labels == c]
            if len(members):
                centers[c] = members.mean(0)
    return centers, labels


def _normalised(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.where(norms > 0, x / np.where(norms > 0, norms, 1), x)


def cluster_select(emb: np.ndarray, keep: int, clusters: int, *, seed: int = 0) -> list[int]:
    """SSR's selection (the reference's ``kmeans_self.py``): K-means over the L2-normalised
    embeddings; cluster ``c`` (``n_c`` of the ``N`` rows) gives its ``round(keep · n_c / N)``
    rows nearest to its centroid (round half to even, as the reference's ``round``). Returns
    row indices, cluster by cluster, nearest first. With ``N <= keep`` every row is kept;
    ``clusters`` is capped at the number of distinct rows."""
    n = len(emb)
    if n <= keep:
        return list(range(n))
    x = _normalised(np.asarray(emb, np.float64))
    k = min(clusters, len(np.unique(x, axis=0)))
    centers, labels = kmeans(x, k, seed=seed)
    dist = np.linalg.norm(x - centers[labels], axis=-1)
    picked: list[int] = []
    for c in range(k):
        members = np.flatnonzero(labels == c)
        quota = round(keep * len(members) / n)
        order = np.argsort(dist[members], kind="stable")[:quota]
        picked += members[order].tolist()
    return picked


def random_select(n: int, keep: int, *, seed: int = 0) -> list[int]:
    """The reference's random-selection ablation (``custom/icl_gen/random_select.py``): a seeded
    uniform sample of ``keep`` of ``n`` rows (all when ``n <= keep``)."""
    if n <= keep:
        return list(range(n))
    return sorted(np.random.default_rng(seed).choice(n, size=keep, replace=False).tolist())


@dataclass
class Synthesis:
    """What :func:`synthesize` made: the in-context prompts and the base model's continuations
    (``samples`` per prompt, in prompt order), the candidate inputs parsed from them, the
    indices of those selected, and the final ``{prompt, response}`` examples."""

    prompts: list[str] = field(default_factory=list)
    continuations: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    selected: list[int] = field(default_factory=list)
    examples: list[dict[str, str]] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)


def synthesize(
    write_inputs: Callable[[list[str]], list[str]],
    write_outputs: Callable[[list[str]], list[str]],
    demos: Sequence[tuple[str, str]],
    *,
    shots: int = 2,
    prompts: int | None = None,
    samples: int = 3,
    keep: int = 200,
    clusters: int = 20,
    select: Literal["kmeans", "random"] = "kmeans",
    seed: int = 0,
    definition: str = "",
    markers: tuple[str, str] = MARKERS,
    prompt_fits: Callable[[str], bool] | None = None,
    input_fits: Callable[[str], bool] | None = None,
    embed_fn: Callable[[Sequence[str]], np.ndarray] | None = None,
) -> Synthesis:
    """SSR's three steps for one finished task.

    ``demos`` are the task's demonstration pool ``(x, y)``; ``write_inputs(prompts)`` is the
    base model (one sampled continuation per prompt), ``write_outputs(inputs)`` the latest model
    (one greedy response per input). In-context prompts that ``prompt_fits`` refuses (too long
    for the model) are left out, as the reference skips those over its length limit;
    candidates that ``input_fits`` refuses (no room left for a response) are dropped. Each
    prompt's ``samples`` continuations are de-duplicated (the reference's ``set``) before
    parsing. Selection is ``kmeans`` (:func:`cluster_select` on ``embed_fn`` vectors, default
    :func:`hashed_embedding`) or ``random`` (:func:`random_select`)."""
    out = Synthesis()
    sets = demonstration_sets(len(demos), shots, limit=prompts, seed=seed)
    out.prompts = [
        icl_prompt([demos[i] for i in s], definition=definition, markers=markers) for s in sets
    ]
    too_long = 0
    if prompt_fits is not None:
        fitting = [p for p in out.prompts if prompt_fits(p)]
        too_long, out.prompts = len(out.prompts) - len(fitting), fitting
    sep = "\n" + markers[1]
    nested = min((x.count(sep) for x, _ in demos), default=0)
    if out.prompts:
        out.continuations = list(write_inputs([p for p in out.prompts for _ in range(samples)]))
        if len(out.continuations) != len(out.prompts) * samples:
            raise ValueError(
                f"ssr: write_inputs returned {len(out.continuations)} texts for "
                f"{len(out.prompts) * samples} prompts"
            )
    parsed = 0
    for j in range(len(out.prompts)):
        for text in dict.fromkeys(out.continuations[j * samples : (j + 1) * samples]):
            found = parse_inputs(text, markers=markers, nested=nested)
            parsed += len(found)
            out.inputs += [x for x in found if input_fits is None or input_fits(x)]
    if select == "kmeans":
        emb = (embed_fn or hashed_embedding)(out.inputs) if out.inputs else np.zeros((0, 1))
        out.selected = cluster_select(emb, keep, clusters, seed=seed)
    else:
        out.selected = random_select(len(out.inputs), keep, seed=seed)
    kept = [out.inputs[i] for i in out.selected]
    responses = list(write_outputs(kept)) if kept else []
    if len(responses) != len(kept):
        raise ValueError(f"ssr: write_outputs returned {len(responses)} texts for {len(kept)}")
    out.examples = [{"prompt": x, "response": y} for x, y in zip(kept, responses)]
    out.stats = {
        "prompts": len(out.prompts),
        "prompts_too_long": too_long,
        "generated": len(out.continuations),
        "parsed": parsed,
        "candidates": len(out.inputs),
        "kept": len(kept),
        "unique_kept": len(set(kept)),
    }
    return out
