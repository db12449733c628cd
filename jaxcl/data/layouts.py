"""Readers for the file layouts of published continual-instruction-tuning benchmarks.

**TRACE** (Wang et al., 2023; ``LLM-CL-Benchmark_500`` / ``_5000``)::

    ROOT/<Task>/train.json    a JSON array of {"prompt": ..., "answer": ...}
    ROOT/<Task>/eval.json
    ROOT/<Task>/test.json

with tasks ``C-STANCE, FOMC, MeetingBank, Py150, ScienceQA, NumGLUE-cm, NumGLUE-ds, 20Minuten``
(:data:`TRACE_ORDER`). The prompt already holds the instruction; the answer is the response.

**The standard CL benchmark as laid out by O-LoRA** (Wang et al., 2023; after Zhang et al.,
2015 / de Masson d'Autume et al., 2019)::

    ROOT/<Category>/<task>/train.json   a JSON array of {"sentence": ..., "label": ...}
    ROOT/<Category>/<task>/dev.json
    ROOT/<Category>/<task>/test.json
    ROOT/<Category>/<task>/labels.json  the label names, a JSON array of strings

with ``TC/{agnews, dbpedia, yahoo}`` and ``SC/{amazon, yelp}``. The prompt is built as O-LoRA
builds it: ``instruction + "Option: " + ", ".join(labels) + " \\n" + sentence + "\\nAnswer:"``,
the category's instruction coming from :data:`OLORA_INSTRUCTIONS` (or an override); the response
is the label. O-LoRA's three task orders are :data:`OLORA_ORDERS`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jaxcl.data.sources import FieldMap, JsonArrayReader, normalize

TRACE_ORDER = (
    "C-STANCE",
    "FOMC",
    "MeetingBank",
    "Py150",
    "ScienceQA",
    "NumGLUE-cm",
    "NumGLUE-ds",
    "20Minuten",
)
TRACE_SPLITS = ("train", "eval", "test")

OLORA_INSTRUCTIONS = {
    "SC": "What is the sentiment of the following paragraph? Choose one from the option.\n",
    "TC": "What is the topic of the following paragraph? Choose one from the option.\n",
    "NLI": 'What is the logical relationship between the "sentence 1" and the "sentence 2"? '
    "Choose one from the option.\n",
    "QQP": 'Whether the "first sentence" and the "second sentence" have the same meaning? '
    "Choose one from the option.\n",
    "BoolQA": "According to the following passage, is the question true or false? "
    "Choose one from the option.\n",
}
OLORA_ORDERS = {
    1: ("dbpedia", "amazon", "yahoo", "agnews"),
    2: ("dbpedia", "amazon", "agnews", "yahoo"),
    3: ("yahoo", "amazon", "agnews", "dbpedia"),
}
OLORA_SPLITS = ("train", "dev", "test")


def trace_tasks(root: str | Path) -> list[str]:
    """The TRACE tasks present under ``root``, in the benchmark's order (others after, sorted)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: no such TRACE benchmark folder")
    present = {p.name for p in root.iterdir() if p.is_dir() and (p / "train.json").exists()}
    if not present:
        raise ValueError(f"{root}: no <Task>/train.json folders (the TRACE layout)")
    return [t for t in TRACE_ORDER if t in present] + sorted(present - set(TRACE_ORDER))


def read_trace(root: str | Path, task: str, split: str) -> list[dict[str, str]]:
    """Instruction examples ``{prompt, response}`` of one TRACE task and split."""
    if split not in TRACE_SPLITS:
        raise ValueError(f"TRACE split {split!r}: valid splits: {', '.join(TRACE_SPLITS)}")
    path = Path(root) / task / f"{split}.json"
    if not path.exists():
        raise ValueError(
            f"{path}: missing; TRACE tasks under {root}: {', '.join(trace_tasks(root))}"
        )
    reader = JsonArrayReader(path)
    if len(reader) == 0:
        raise ValueError(f"{path}: the dataset is empty")
    fm = FieldMap({"prompt": "prompt", "response": "answer"})
    return [normalize(reader[i], "instruction", fm, reader.where(i)) for i in range(len(reader))]


def _olora_dir(root: Path, task: str) -> Path:
    if not root.is_dir():
        raise ValueError(f"{root}: no such CL benchmark folder")
    hits = sorted(p for p in root.glob(f"*/{task}") if p.is_dir())
    if not hits:
        found = sorted(p.name for p in root.glob("*/*") if p.is_dir())
        raise ValueError(f"{root}: no <Category>/{task} folder; tasks present: {', '.join(found)}")
    return hits[0]


def olora_tasks(root: str | Path) -> dict[str, str]:
    """``{task: category}`` for every task folder under an O-LoRA ``CL_Benchmark`` root."""
    root = Path(root)
    return {p.name: p.parent.name for p in sorted(root.glob("*/*")) if (p / "labels.json").exists()}


def read_olora(
    root: str | Path, task: str, split: str, instruction: str | None = None
) -> list[dict[str, str]]:
    """Instruction examples ``{prompt, response}`` of one task of the O-LoRA layout."""
    if split not in OLORA_SPLITS:
        raise ValueError(f"O-LoRA split {split!r}: valid splits: {', '.join(OLORA_SPLITS)}")
    folder = _olora_dir(Path(root), task)
    category = folder.parent.name
    labels_path = folder / "labels.json"
    labels = _json(labels_path)
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise ValueError(f"{labels_path}: expected a non-empty JSON array of label names")
    if instruction is None:
        if category not in OLORA_INSTRUCTIONS:
            raise ValueError(
                f"{folder}: no built-in instruction for category {category!r} "
                f"(known: {', '.join(OLORA_INSTRUCTIONS)}); pass instruction=..."
            )
        instruction = OLORA_INSTRUCTIONS[category]
    path = folder / f"{split}.json"
    if not path.exists():
        raise ValueError(f"{path}: missing (split {split!r} of task {task})")
    reader = JsonArrayReader(path)
    if len(reader) == 0:
        raise ValueError(f"{path}: the dataset is empty")
    head = instruction + "Option: " + ", ".join(labels) + " \n"
    out = []
    fm = FieldMap({"text": "sentence"})
    for i in range(len(reader)):
        where = reader.where(i)
        sentence = normalize(reader[i], "text", fm, where)["text"]
        label = normalize(reader[i], "text", FieldMap({"text": "label"}), where)["text"]
        if label not in labels:
            raise ValueError(
                f"{where}: field 'label' is {label!r}, not one of {labels_path.name}: "
                f"{', '.join(labels)}"
            )
        out.append({"prompt": head + sentence + "\nAnswer:", "response": label})
    return out


def _json(path: Path) -> Any:
    if not path.exists():
        raise ValueError(f"{path}: missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}, line {e.lineno}: malformed JSON ({e.msg})") from None
