"""lm-evaluation-harness tasks built from jaxcl's bundled data, so that standard-harness probes
run offline with nothing to download: multiple-choice suites over the built-in probe items
(general knowledge, instruction following, safety) and over the bundled instruction tasks.

Each task is a YAML file plus a JSONL of ``{"query", "choices", "gold"}`` documents, scored by
lm-eval's ``multiple_choice`` output type: ``acc`` is the share of documents whose gold choice
has the highest summed log-likelihood ``Σ_t log p(c_t | query, c_<t)``, ``acc_norm`` the same
with each sum divided by the choice's length in bytes. The choices carry their leading space
(``target_delimiter: ""``), as the probes' continuations do.

:func:`bundled_task_dir` writes them once per process to a temporary folder (lm-eval reads
``data_files`` by absolute path); :func:`jaxcl.eval.harness_run.run_lm_eval` always includes
it, so a recipe's ``probes.lm_eval`` names these tasks like any lm-eval task.
"""

from __future__ import annotations

import atexit
import json
import random
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from jaxcl.data.benchmarks import generate
from jaxcl.eval.probes import PROBES, probe_items

Doc = dict[str, object]

#: items drawn per probe task (fewer documents: each prompt is kept once)
PROBE_DOCS = 64


def _doc(query: str, gold: str, wrong: Sequence[str], rng: random.Random) -> Doc:
    """One multiple-choice document: ``gold`` among the ``wrong`` choices, shuffled."""
    choices = [gold, *wrong]
    rng.shuffle(choices)
    return {"query": query, "choices": choices, "gold": choices.index(gold)}


def _distractors(pool: Sequence[str], gold: str, k: int, rng: random.Random) -> list[str]:
    others = sorted(set(pool) - {gold})
    if len(others) < k:
        raise ValueError(f"{k} distractors wanted for {gold!r}, the pool has {len(others)}")
    return rng.sample(others, k)


def probe_suite_docs(suite: str, size: int = PROBE_DOCS, seed: int = 0) -> list[Doc]:
    """A probe suite (``general``, ``instruction``, ``safety``) as multiple choice: every item
    of :func:`jaxcl.eval.probes.probe_items` (each prompt once) with its correct continuation
    against the wrong one, plus two wrong continuations drawn from the other items of its task
    where they offer two (four choices), else the pair alone."""
    if suite not in PROBES:
        raise ValueError(f"unknown probe suite {suite!r}: one of {sorted(PROBES)}")
    rng = random.Random(f"lm_eval/{suite}/{seed}")
    docs = []
    for task in PROBES[suite]:
        items = probe_items(suite, task, size, seed)
        pool = {it["chosen"] for it in items} | {it["rejected"] for it in items}
        for it in {it["prompt"]: it for it in items}.values():  # each prompt once
            others = sorted(pool - {it["chosen"], it["rejected"]})
            extra = rng.sample(others, 2) if len(others) >= 2 else []
            docs.append(_doc(it["prompt"], it["chosen"], [it["rejected"], *extra], rng))
    return docs


def instruction_task_docs(
    capitals: int = 16, antonyms: int = 8, sentiment: int = 8, seed: int = 0
) -> list[Doc]:
    """The bundled instruction tasks' eval splits as multiple choice: capitals and antonyms
    with three distractors from the task's training answers, sentiment between its two
    labels."""
    rng = random.Random(f"lm_eval/cit/{seed}")
    docs = []
    for task, size in (("cit/capitals", capitals), ("cit/antonyms", antonyms)):
        pool = [ex["response"] for ex in generate(task, "train", 200)]
        for ex in generate(task, "eval", size):
            wrong = _distractors(pool, ex["response"], 3, rng)
            docs.append(_doc(ex["prompt"], ex["response"], wrong, rng))
    for ex in generate("cit/sentiment", "eval", sentiment):
        wrong = [label for label in (" positive", " negative") if label != ex["response"]]
        docs.append(_doc(ex["prompt"], ex["response"], wrong, rng))
    return docs


#: task name -> its documents
BUNDLED_TASKS: dict[str, Callable[[], list[Doc]]] = {
    "jaxcl_general_mc": lambda: probe_suite_docs("general"),
    "jaxcl_instruction_mc": lambda: probe_suite_docs("instruction"),
    "jaxcl_safety_mc": lambda: probe_suite_docs("safety"),
    "jaxcl_cit_mc": instruction_task_docs,
}


def multiple_choice_yaml(name: str, data: Path) -> str:
    """An lm-eval task YAML scoring the JSONL ``data`` (absolute path) as multiple choice."""
    return (
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{query}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{gold}}'\n"
        "target_delimiter: ''\n"
        "metric_list:\n"
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n"
    )


def write_multiple_choice_task(folder: Path, name: str, docs: Sequence[Doc]) -> Path:
    """``folder/<name>.jsonl`` and ``folder/<name>.yaml``; returns the YAML's path."""
    folder.mkdir(parents=True, exist_ok=True)
    data = (folder / f"{name}.jsonl").resolve()
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    path = folder / f"{name}.yaml"
    path.write_text(multiple_choice_yaml(name, data))
    return path


def write_bundled_tasks(folder: Path) -> list[str]:
    """Every task of :data:`BUNDLED_TASKS` into ``folder``; returns their names."""
    for name, docs in BUNDLED_TASKS.items():
        write_multiple_choice_task(folder, name, docs())
    return list(BUNDLED_TASKS)


_FOLDER: list[Path] = []


def bundled_task_dir() -> Path:
    """A temporary folder holding the bundled tasks, written on first use in this process and
    removed at its exit."""
    if not _FOLDER:
        folder = Path(tempfile.mkdtemp(prefix="jaxcl-lm-eval-tasks-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        write_bundled_tasks(folder)
        _FOLDER.append(folder)
    return _FOLDER[0]
