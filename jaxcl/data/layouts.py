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
is the label. As O-LoRA's scripts run it (``--add_task_name True --add_dataset_name True``),
the prompt starts with ``"Task:<Category>\nDataset:<task>\n"`` (``task_prefix=False`` leaves it
out). COPA's prompt is the sentence alone (O-LoRA gives it no instruction and no options:
:data:`OLORA_BARE`). The same layout holds the long benchmark's 15 tasks
(``NLI/{MNLI,CB,RTE}``, ``QQP/QQP``, ``SC/{IMDB,SST-2}``, ``BoolQA/BoolQA``, ``COPA/COPA``,
``MultiRC/MultiRC``, ``WiC/WiC`` beside the five above). :data:`OLORA_ORDERS` holds orders 1-3
(four tasks of the standard benchmark) and 4-6 (the 15 tasks).

**SuperNI, 15 tasks** (the continual-learning split of Super-NaturalInstructions laid out by
SAPT, Zhao et al., 2024, and reused by GainLoRA)::

    ROOT/SuperNI/<task>/train.json   a Natural Instructions task file: {"Definition": [...],
    ROOT/SuperNI/<task>/dev.json      "Instances": [{"id", "input", "output": [...]}, ...], ...}
    ROOT/SuperNI/<task>/test.json

``ROOT`` is the same ``CL_Benchmark`` folder. The prompt is SAPT's zero-shot one,
``"Definition: " + definition + "\n\nNow complete the following example -\nInput: " + input +
"\nOutput: "``; the response is the instance's first output (stripped). Its two task orders
are :data:`SUPERNI_ORDERS`; its tasks are scored by ROUGE-L.

**LIMA** (Zhou et al., 2023), the general instruction data TRACE replays: the processed copy
in TRACE's archive is a TRACE task folder (``LLM-CL-Benchmark_5000/Lima/{train,eval,test}.json``,
read by :func:`read_trace` with ``task="Lima"``); the original release (``GAIR/lima``)::

    ROOT/train.jsonl   one {"conversations": [user, assistant, ...], "source": ...} per line
    ROOT/test.jsonl    prompts only (one user turn): not trainable, not read

is read by :func:`read_lima`: a two-turn conversation becomes ``{prompt, response}``, a longer
one ``{messages}`` (user and assistant turns alternating).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jaxcl.data.sources import BadRowError, FieldMap, JsonArrayReader, JsonlReader, normalize

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
    "MultiRC": "According to the following passage and question, is the candidate answer true "
    "or false? Choose one from the option.\n",
    "WiC": "Given a word and two sentences, whether the word is used with the same sense in both "
    "sentence? Choose one from the option.\n",
}
#: categories whose prompt is the sentence alone (O-LoRA's ``load_COPA_dataset``)
OLORA_BARE = ("COPA",)
#: orders 1-3: the standard benchmark (O-LoRA's scripts/order_{1,2,3}.sh); orders 4-6: the long
#: 15-task benchmark (4 and 5: the cumulative test lists of configs/order{4,5}_configs in
#: github.com/Wcxwcxw/GORP, an O-LoRA-based repository; 6: O-LoRA's own scripts/long.sh)
OLORA_ORDERS = {
    1: ("dbpedia", "amazon", "yahoo", "agnews"),
    2: ("dbpedia", "amazon", "agnews", "yahoo"),
    3: ("yahoo", "amazon", "agnews", "dbpedia"),
    4: (
        "MNLI", "CB", "WiC", "COPA", "QQP", "BoolQA", "RTE", "IMDB",
        "yelp", "amazon", "SST-2", "dbpedia", "agnews", "MultiRC", "yahoo",
    ),
    5: (
        "MultiRC", "BoolQA", "WiC", "MNLI", "CB", "COPA", "QQP", "RTE",
        "IMDB", "SST-2", "dbpedia", "agnews", "yelp", "amazon", "yahoo",
    ),
    6: (
        "yelp", "amazon", "MNLI", "CB", "COPA", "QQP", "RTE", "IMDB",
        "SST-2", "dbpedia", "agnews", "yahoo", "MultiRC", "BoolQA", "WiC",
    ),
}  # fmt: skip
OLORA_SPLITS = ("train", "dev", "test")

#: SuperNI's 15 tasks in SAPT's order (order 1: the cumulative test lists of SAPT's
#: configs/SuperNI, github.com/circle-hit/SAPT; GainLoRA's gen_script_superni_order1 agrees) and
#: GainLoRA's order 2 (gen_script_superni_order2_t5_*.sh, github.com/liangyanshuo/gainlora)
SUPERNI_ORDERS = {
    1: (
        "task1572_samsum_summary",
        "task363_sst2_polarity_classification",
        "task1290_xsum_summarization",
        "task181_outcome_extraction",
        "task002_quoref_answer_generation",
        "task1510_evalution_relation_extraction",
        "task639_multi_woz_user_utterance_generation",
        "task1729_personachat_generate_next",
        "task073_commonsenseqa_answer_generation",
        "task1590_diplomacy_text_generation",
        "task748_glucose_reverse_cause_event_detection",
        "task511_reddit_tifu_long_text_summarization",
        "task591_sciq_answer_generation",
        "task1687_sentiment140_classification",
        "task875_emotion_classification",
    ),
    2: (
        "task748_glucose_reverse_cause_event_detection",
        "task073_commonsenseqa_answer_generation",
        "task1590_diplomacy_text_generation",
        "task639_multi_woz_user_utterance_generation",
        "task1572_samsum_summary",
        "task1687_sentiment140_classification",
        "task591_sciq_answer_generation",
        "task363_sst2_polarity_classification",
        "task1510_evalution_relation_extraction",
        "task1729_personachat_generate_next",
        "task181_outcome_extraction",
        "task511_reddit_tifu_long_text_summarization",
        "task002_quoref_answer_generation",
        "task1290_xsum_summarization",
        "task875_emotion_classification",
    ),
}
SUPERNI_SPLITS = ("train", "dev", "test")
LIMA_SPLITS = ("train",)


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
    root: str | Path,
    task: str,
    split: str,
    instruction: str | None = None,
    *,
    task_prefix: bool = True,
) -> list[dict[str, str]]:
    """Instruction examples ``{prompt, response}`` of one task of the O-LoRA layout.

    ``task_prefix``: start the prompt with ``Task:<Category>\nDataset:<task>\n``, as O-LoRA's
    collator does under its scripts' ``--add_task_name True --add_dataset_name True``."""
    if split not in OLORA_SPLITS:
        raise ValueError(f"O-LoRA split {split!r}: valid splits: {', '.join(OLORA_SPLITS)}")
    folder = _olora_dir(Path(root), task)
    category = folder.parent.name
    labels_path = folder / "labels.json"
    labels = _json(labels_path)
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise ValueError(f"{labels_path}: expected a non-empty JSON array of label names")
    bare = instruction is None and category in OLORA_BARE
    if instruction is None and not bare:
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
    head = f"Task:{category}\nDataset:{folder.name}\n" if task_prefix else ""
    if not bare:
        head += instruction + "Option: " + ", ".join(labels) + " \n"  # type: ignore[operator]
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


def _superni_dir(root: Path, task: str) -> Path:
    if not root.is_dir():
        raise ValueError(f"{root}: no such CL benchmark folder")
    folder = root / "SuperNI" / task
    if not folder.is_dir():
        found = sorted(p.name for p in (root / "SuperNI").glob("*") if p.is_dir())
        raise ValueError(
            f"{folder}: missing; SuperNI tasks under {root}: {', '.join(found) or 'none'}"
        )
    return folder


def superni_tasks(root: str | Path) -> list[str]:
    """The SuperNI task folders under a ``CL_Benchmark`` root (``ROOT/SuperNI/<task>``), sorted."""
    folder = Path(root) / "SuperNI"
    return sorted(p.name for p in folder.glob("*") if (p / "train.json").exists())


def read_superni(root: str | Path, task: str, split: str) -> list[dict[str, str]]:
    """Instruction examples ``{prompt, response}`` of one SuperNI task (SAPT's zero-shot
    prompt: the task's definition, then the instance's input; the response its first output)."""
    if split not in SUPERNI_SPLITS:
        raise ValueError(f"SuperNI split {split!r}: valid splits: {', '.join(SUPERNI_SPLITS)}")
    path = _superni_dir(Path(root), task) / f"{split}.json"
    data = _json(path)
    if not isinstance(data, dict) or not isinstance(data.get("Instances"), list):
        raise ValueError(f"{path}: expected a Natural Instructions task object with 'Instances'")
    definition = data.get("Definition")
    if isinstance(definition, list):
        definition = definition[0] if definition else None
    if not isinstance(definition, str):
        raise ValueError(f"{path}: field 'Definition' must be a string or a list of strings")
    if not data["Instances"]:
        raise ValueError(f"{path}: the dataset is empty")
    head = "Definition: " + definition.strip() + "\n\nNow complete the following example -\n"
    out = []
    for i, inst in enumerate(data["Instances"]):
        where = f"{path}, instance {i}"
        if not isinstance(inst, dict) or not isinstance(inst.get("input"), str):
            raise BadRowError(where, "field 'input' (the prompt) must be a string")
        outputs = inst.get("output")
        if isinstance(outputs, str):
            outputs = [outputs]
        if not isinstance(outputs, list) or not outputs or not isinstance(outputs[0], str):
            raise BadRowError(where, "field 'output' must be a non-empty list of strings")
        out.append(
            {
                "prompt": head + "Input: " + inst["input"] + "\nOutput: ",
                "response": outputs[0].strip(),
            }
        )
    return out


def read_lima(root: str | Path, split: str = "train") -> list[dict[str, Any]]:
    """Instruction examples of the LIMA release (``ROOT/train.jsonl``): ``{prompt, response}``
    for a two-turn conversation, ``{messages}`` (user/assistant alternating) for a longer one."""
    if split not in LIMA_SPLITS:
        raise ValueError(
            f"LIMA split {split!r}: valid splits: {', '.join(LIMA_SPLITS)} (its test.jsonl holds "
            "prompts without responses)"
        )
    path = Path(root) / f"{split}.jsonl"
    if not path.exists():
        raise ValueError(f"{path}: missing (the LIMA release's {split}.jsonl)")
    reader = JsonlReader(path)
    if len(reader) == 0:
        raise ValueError(f"{path}: the dataset is empty")
    out: list[dict[str, Any]] = []
    for i in range(len(reader)):
        where, record = reader.where(i), reader[i]
        turns = record.get("conversations") if isinstance(record, dict) else None
        if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
            raise BadRowError(where, "field 'conversations' must be a list of strings")
        if len(turns) < 2 or len(turns) % 2:
            raise BadRowError(
                where,
                f"field 'conversations' has {len(turns)} turns; a training conversation "
                "alternates user and assistant turns and ends with the assistant's",
            )
        if len(turns) == 2:
            out.append({"prompt": turns[0], "response": turns[1]})
        else:
            roles = ("user", "assistant")
            out.append(
                {"messages": [{"role": roles[k % 2], "content": t} for k, t in enumerate(turns)]}
            )
    return out


def _json(path: Path) -> Any:
    if not path.exists():
        raise ValueError(f"{path}: missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}, line {e.lineno}: malformed JSON ({e.msg})") from None
