"""A CKL-style knowledge stream (after Jang et al., 2022, "Towards Continual Knowledge Learning").

A small invented world of towns, firms and clubs, seen over :data:`PERIODS` time periods. Its
facts are of three sorts:

* **invariant** facts hold in every period and are stated only in the period-0 corpus
  (InvariantLAMA: does continued pretraining keep them?);
* **updated** facts change value in period ``k >= 1`` (UpdatedLAMA: is the new value learnt,
  and the stale one dropped?);
* **new** facts concern subjects first mentioned in period ``k >= 1`` (NewLAMA).

Datasets (``bundled:`` names; text corpora are CPT data, probes are instruction data scored by
exact match):

==========================  =============================================================
``ckl/t{k}``                corpus of period ``k`` (statements of the facts it introduces)
``ckl/t{k}/invariant``      probes of the invariant facts (the same in every period)
``ckl/t0/initial``          probes of the updatable facts' period-0 values
``ckl/t{k}/updated``        probes of the facts updated in period ``k`` (new values), k >= 1
``ckl/t{k}/stale``          the same questions answered with the outdated values, k >= 1
``ckl/t{k}/new``            probes of the facts new in period ``k``, k >= 1
==========================  =============================================================

The world is fixed (it does not depend on the split or seed); splits and seeds only change which
facts and paraphrases are drawn, as knowledge probes do.
"""

from __future__ import annotations

import random
from collections.abc import Callable

Example = dict[str, str]
Fact = tuple[str, str, str]  # (relation, subject, object)

PERIODS = 3
INVARIANT, UPDATED, NEW = 12, 6, 6

_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "vo", "zi", "be", "do", "fa", "gu", "ho", "pe"]

# relation -> (statement paraphrases, question)
RELATIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "mayor": (
        ("The mayor of {s} is {o}.", "{o} serves as the mayor of {s}.", "{s} is led by mayor {o}."),
        "Q: Who is the mayor of {s}?\nA:",
    ),
    "ceo": (
        ("The chief of {s} is {o}.", "{o} runs the firm {s}.", "{s} has {o} as its chief."),
        "Q: Who runs {s}?\nA:",
    ),
    "coach": (
        ("The coach of {s} is {o}.", "{o} coaches the club {s}.", "{s} is trained by {o}."),
        "Q: Who coaches {s}?\nA:",
    ),
    "river": (
        ("{s} lies on the river {o}.", "The river {o} flows through {s}.", "{s} sits by the {o}."),
        "Q: Which river runs through {s}?\nA:",
    ),
}


def _name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(parts)).capitalize()


def _world() -> dict[str, list[Fact]]:
    """Every fact set of the stream, keyed ``invariant``, ``initial``, ``updated/k``, ``new/k``."""
    rng = random.Random("jaxcl/ckl/world")
    used: set[str] = set()

    def fresh(parts: int) -> str:
        while True:
            name = _name(rng, parts)
            if name not in used:
                used.add(name)
                return name

    relations = list(RELATIONS)
    world: dict[str, list[Fact]] = {}
    world["invariant"] = [
        (relations[i % len(relations)], fresh(3), fresh(2)) for i in range(INVARIANT)
    ]
    # Updatable facts: people-valued relations only (a river does not move).
    movable = [r for r in relations if r != "river"]
    current = [(movable[i % len(movable)], fresh(3), fresh(2)) for i in range(UPDATED * 2)]
    world["initial"] = list(current)
    for k in range(1, PERIODS):
        # Period k updates a rotating half of the updatable facts.
        picks = [(k - 1 + 2 * j) % len(current) for j in range(UPDATED)]
        world[f"stale/{k}"] = [current[i] for i in picks]
        for i in picks:
            rel, subj, _ = current[i]
            current[i] = (rel, subj, fresh(2))
        world[f"updated/{k}"] = [current[i] for i in picks]
        world[f"new/{k}"] = [
            (relations[j % len(relations)], fresh(3), fresh(2)) for j in range(NEW)
        ]
    return world


WORLD = _world()


def corpus_facts(period: int) -> list[Fact]:
    """The facts the corpus of ``period`` states."""
    if period == 0:
        return WORLD["invariant"] + WORLD["initial"]
    return WORLD[f"updated/{period}"] + WORLD[f"new/{period}"]


def _statement(fact: Fact, rng: random.Random) -> str:
    rel, subj, obj = fact
    return rng.choice(RELATIONS[rel][0]).format(s=subj, o=obj)


def _probe(fact: Fact) -> Example:
    rel, subj, obj = fact
    return {"prompt": RELATIONS[rel][1].format(s=subj), "response": f" {obj}"}


def _corpus(period: int) -> Callable[[random.Random], Example]:
    facts = corpus_facts(period)

    def make(rng: random.Random) -> Example:
        # Two statements per document, so every document is a little story of the period.
        a, b = rng.choice(facts), rng.choice(facts)
        return {"text": f"{_statement(a, rng)} {_statement(b, rng)}"}

    return make


def _probes(key: str) -> Callable[[random.Random], Example]:
    facts = WORLD[key]
    return lambda rng: _probe(rng.choice(facts))


def _generators() -> dict[str, tuple[str, Callable[[random.Random], Example]]]:
    gens: dict[str, tuple[str, Callable[[random.Random], Example]]] = {}
    for k in range(PERIODS):
        gens[f"ckl/t{k}"] = ("text", _corpus(k))
        gens[f"ckl/t{k}/invariant"] = ("instruction", _probes("invariant"))
        if k == 0:
            gens["ckl/t0/initial"] = ("instruction", _probes("initial"))
        else:
            gens[f"ckl/t{k}/updated"] = ("instruction", _probes(f"updated/{k}"))
            gens[f"ckl/t{k}/stale"] = ("instruction", _probes(f"stale/{k}"))
            gens[f"ckl/t{k}/new"] = ("instruction", _probes(f"new/{k}"))
    return gens


GENERATORS = _generators()


def probe_set(key: str) -> list[Example]:
    """Every probe of a fact set (``invariant``, ``initial``, ``updated/k``, ``stale/k``,
    ``new/k``), once each, in a fixed order: the full probe suite for evaluation."""
    if key not in WORLD:
        raise ValueError(f"unknown CKL fact set {key!r}; valid sets: {', '.join(WORLD)}")
    return [_probe(f) for f in WORLD[key]]
