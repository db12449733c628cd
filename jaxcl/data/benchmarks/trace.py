"""A TRACE-style sequence of eight instruction tasks (after Wang et al., 2023, "TRACE").

Each task mimics one TRACE task in format and scorer, in a small invented world, so a tiny model
learns each in seconds and forgetting is measurable; the same prompts suit SmolLM2.

=====================  ===========================  ==================================  ========
name                   mimics                       format                              scorer
=====================  ===========================  ==================================  ========
``trace/stance``       C-STANCE (stance detection)  text + target -> favor/against/...  exact
``trace/policy``       FOMC (monetary stance)       sentence -> dovish/hawkish/neutral  exact
``trace/meeting``      MeetingBank (summaries)      transcript -> one-line summary      ROUGE-L
``trace/keywords``     Papyrus-f (French keywords)  English title -> French keywords    ROUGE-L
``trace/code``         Py150 (next line of code)    code with <EOL> -> next line        exact
``trace/science``      ScienceQA (multiple choice)  question + choices -> letter        exact
``trace/numbers``      NumGLUE (arithmetic)         word problem -> number              exact
``trace/simplify``     20Minuten (German simpler)   German sentence -> simple sentence  ROUGE-L
=====================  ===========================  ==================================  ========

:func:`write_trace_layout` writes them in TRACE's own file layout (``ROOT/<Task>/{train,eval,
test}.json`` arrays of ``{prompt, answer}``), so the ``trace`` source reads them like the real one.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

Example = dict[str, str]

_TARGETS = ["the new park", "the tram line", "the night market", "the bike lanes", "the dam"]
_FAVOR = ["We love", "I fully support", "Everyone cheers for", "Great news about"]
_AGAINST = ["We oppose", "I strongly reject", "Nobody wants", "Stop wasting money on"]
_NEUTRAL = ["The paper mentioned", "Someone asked about", "A report described", "I walked past"]


def _stance(rng: random.Random) -> Example:
    label, cues = rng.choice([("favor", _FAVOR), ("against", _AGAINST), ("neutral", _NEUTRAL)])
    target = rng.choice(_TARGETS)
    return {
        "prompt": f"Stance toward the target? Answer favor, against or neutral.\n"
        f"Text: {rng.choice(cues)} {target}.\nTarget: {target}\nStance:",
        "response": f" {label}",
    }


_HAWKISH = ["rates must rise", "policy will tighten", "inflation calls for higher rates"]
_DOVISH = ["rates should fall", "policy will ease", "slack calls for lower rates"]
_NEUTRAL_POLICY = ["the committee met on Tuesday", "staff presented the outlook", "data arrived"]


def _policy(rng: random.Random) -> Example:
    label, cues = rng.choice(
        [("hawkish", _HAWKISH), ("dovish", _DOVISH), ("neutral", _NEUTRAL_POLICY)]
    )
    who = rng.choice(["Members agreed that", "The chair said", "Several officials noted that"])
    return {
        "prompt": "Monetary policy stance? Answer dovish, hawkish or neutral.\n"
        f"Sentence: {who} {rng.choice(cues)}.\nStance:",
        "response": f" {label}",
    }


_MOTIONS = ["repair", "fund", "close", "expand", "rename"]
_TOPICS = ["the library", "Pier 9", "the north bridge", "the bus depot", "Elm Street park"]
_MEMBERS = ["Ortiz", "Chen", "Okafor", "Novak", "Haddad", "Larsen"]


def _meeting(rng: random.Random) -> Example:
    motion, topic = rng.choice(_MOTIONS), rng.choice(_TOPICS)
    a, b = rng.sample(_MEMBERS, 2)
    yes = rng.randint(5, 9)
    no = 9 - yes
    item = rng.randint(10, 40)
    return {
        "prompt": "Summarize the meeting.\n"
        f"Transcript: Item {item}. Member {a}: I move that we {motion} {topic}. "
        f"Member {b}: Second. Clerk: the vote is {yes} to {no}.\nSummary:",
        "response": f" Motion to {motion} {topic} carried {yes} to {no}.",
    }


_FRENCH = {
    "water": "eau",
    "city": "ville",
    "health": "santé",
    "school": "école",
    "law": "droit",
    "forest": "forêt",
    "work": "travail",
    "language": "langue",
}


def _keywords(rng: random.Random) -> Example:
    a, b = rng.sample(sorted(_FRENCH), 2)
    return {
        "prompt": "Give the key words of the title in French.\n"
        f"Title: A study of {a} and {b} in Quebec\nKey words:",
        "response": f" {_FRENCH[a]}, {_FRENCH[b]}, Québec",
    }


def _code(rng: random.Random) -> Example:
    name = rng.choice(["total", "count", "acc", "result", "value"])
    fn = rng.choice(["add", "scale", "merge", "sum_up"])
    op = rng.choice(["+", "*", "-"])
    return {
        "prompt": "Complete the next line of the Python code.\n"
        f"def {fn} ( a , b ) : <EOL> {name} = a {op} b <EOL>",
        "response": f" return {name}",
    }


_KINDS = [
    ("mammal", ["whale", "bat", "horse", "otter"], ["shark", "trout", "frog", "eagle"]),
    ("bird", ["eagle", "owl", "robin", "swan"], ["bat", "moth", "whale", "lizard"]),
    ("metal", ["iron", "copper", "silver", "tin"], ["glass", "wood", "wool", "clay"]),
]


def _science(rng: random.Random) -> Example:
    kind, yes, no = rng.choice(_KINDS)
    right, wrong = rng.choice(yes), rng.choice(no)
    first_right = rng.random() < 0.5
    a, b = (right, wrong) if first_right else (wrong, right)
    return {
        "prompt": f"Question: Which is a {kind}?\nChoices:\nA. {a}\nB. {b}\nAnswer:",
        "response": " A" if first_right else " B",
    }


def _numbers(rng: random.Random) -> Example:
    who = rng.choice(["Ana", "Ben", "Ravi", "Mia", "Tom"])
    thing = rng.choice(["apples", "stamps", "books", "coins"])
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    if rng.random() < 0.5:
        question, answer = f"{who} has {a} {thing} and gets {b} more. How many now?", a + b
    else:
        a, b = max(a, b), min(a, b)
        question, answer = f"{who} has {a} {thing} and gives away {b}. How many now?", a - b
    return {"prompt": f"Problem: {question}\nAnswer:", "response": f" {answer}"}


_DE_SUBJECT = [("Der Gemeinderat", "Die Stadt"), ("Die Kantonsregierung", "Der Kanton")]
_DE_ACTION = [
    ("hat die umfassende Sanierung der Schule beschlossen", "renoviert die Schule"),
    ("hat den Ausbau des Radwegnetzes genehmigt", "baut mehr Radwege"),
    ("hat eine Erhöhung der Parkgebühren verabschiedet", "erhöht die Parkgebühren"),
    ("hat die Schließung des Hallenbads angekündigt", "schließt das Hallenbad"),
]


def _simplify(rng: random.Random) -> Example:
    (subj, simple_subj), (action, simple_action) = rng.choice(_DE_SUBJECT), rng.choice(_DE_ACTION)
    return {
        "prompt": f"Vereinfache den Satz.\nSatz: {subj} {action}.\nEinfach:",
        "response": f" {simple_subj} {simple_action}.",
    }


GENERATORS: dict[str, tuple[str, Callable[[random.Random], Example]]] = {
    "trace/stance": ("instruction", _stance),
    "trace/policy": ("instruction", _policy),
    "trace/meeting": ("instruction", _meeting),
    "trace/keywords": ("instruction", _keywords),
    "trace/code": ("instruction", _code),
    "trace/science": ("instruction", _science),
    "trace/numbers": ("instruction", _numbers),
    "trace/simplify": ("instruction", _simplify),
}

TASKS: tuple[str, ...] = tuple(GENERATORS)

SCORER: dict[str, str] = {
    "trace/stance": "exact_match",
    "trace/policy": "exact_match",
    "trace/meeting": "rouge_l",
    "trace/keywords": "rouge_l",
    "trace/code": "exact_match",
    "trace/science": "exact_match",
    "trace/numbers": "exact_match",
    "trace/simplify": "rouge_l",
}


def write_trace_layout(
    root: str | Path,
    generate: Callable[[str, str, int, int], list[Example]],
    *,
    tasks: Sequence[str] = TASKS,
    sizes: dict[str, int] | None = None,
    seed: int = 0,
) -> list[Path]:
    """Write ``tasks`` as ``ROOT/<task>/{train,eval,test}.json`` in TRACE's format.

    ``generate(name, split, size, seed)`` is :func:`jaxcl.data.benchmarks.generate`; the ``test``
    split is drawn like ``eval`` with ``seed + 1``. Returns the task folders.
    """
    sizes = {"train": 256, "eval": 64, "test": 64, **(sizes or {})}
    folders = []
    for name in tasks:
        folder = Path(root) / name.split("/", 1)[1]
        folder.mkdir(parents=True, exist_ok=True)
        for split in ("train", "eval", "test"):
            source_split = "train" if split == "train" else "eval"
            rows = generate(name, source_split, sizes[split], seed + (split == "test"))
            records = [{"prompt": r["prompt"], "answer": r["response"]} for r in rows]
            (folder / f"{split}.json").write_text(json.dumps(records, ensure_ascii=False))
        folders.append(folder)
    return folders
