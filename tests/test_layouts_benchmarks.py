"""Benchmark layouts of the reproduction recipes: O-LoRA's long benchmark (COPA, WiC, MultiRC and
the task prefix of its scripts), SuperNI in SAPT's layout, LIMA in TRACE's archive and in its own
release, and LIMA as replay's general data (TRACE's replay)."""

import json
from pathlib import Path

import numpy as np
import pytest

from jaxcl.data.layouts import (
    OLORA_ORDERS,
    SUPERNI_ORDERS,
    olora_tasks,
    read_lima,
    read_olora,
    read_superni,
    read_trace,
    superni_tasks,
)
from jaxcl.data.pipeline import encode_all
from jaxcl.data.prepare import input_files
from jaxcl.data.replay import ReplayBuffer
from jaxcl.data.sources import BadRowError
from jaxcl.data.spec import DataSpec
from jaxcl.methods.memory import GENERAL, ReplaySpec
from jaxcl.methods.protocol import Carry, Context, TaskInfo
from jaxcl.models.tokenizer import ByteTokenizer

FIX = Path(__file__).parent / "fixtures" / "reproduction"
CL = FIX / "olora" / "CL_Benchmark"
TOK = ByteTokenizer()


def test_long_benchmark_fixture_holds_orders_4_to_6():
    tasks = olora_tasks(CL)
    for order in (4, 5, 6):
        assert len(OLORA_ORDERS[order]) == len(set(OLORA_ORDERS[order])) == 15
        assert set(OLORA_ORDERS[order]) <= set(tasks)
    assert set(OLORA_ORDERS[4]) == set(OLORA_ORDERS[5]) == set(OLORA_ORDERS[6])
    assert {tasks[t] for t in ("MNLI", "CB", "RTE")} == {"NLI"}
    assert tasks["IMDB"] == tasks["SST-2"] == "SC"


def test_olora_prompts_as_its_collator_builds_them():
    """--add_task_name/--add_dataset_name True: 'Task:<Category>\\nDataset:<task>\\n' first; COPA
    has neither instruction nor options (O-LoRA's load_COPA_dataset)."""
    copa = read_olora(CL, "COPA", "train")[0]
    assert copa["prompt"] == (
        'Task:COPA\nDataset:COPA\nWhich sentence is the cause of "The grass was wet."? '
        "Choose one between A and B.\nA: It rained overnight.\nB: The sun was hot.\nAnswer:"
    )
    assert copa["response"] == "A"
    wic = read_olora(CL, "WiC", "test", task_prefix=False)[0]["prompt"]
    assert wic.startswith("Given a word and two sentences, whether the word is used with the same")
    assert "\nOption: True, False \nword: bank\n" in wic
    multirc = read_olora(CL, "MultiRC", "dev")[0]["prompt"]
    assert multirc.startswith("Task:MultiRC\nDataset:MultiRC\nAccording to the following passage")
    spec = DataSpec(source={"type": "olora", "root": str(CL), "task": "QQP", "eval_split": "dev"})
    assert spec.load("eval")[0]["prompt"].startswith("Task:QQP\nDataset:QQP\nWhether the")


def test_superni_layout_and_prompt():
    assert superni_tasks(CL) == sorted(SUPERNI_ORDERS[1]) == sorted(SUPERNI_ORDERS[2])
    rows = read_superni(CL, "task1572_samsum_summary", "train")
    assert len(rows) == 12
    assert rows[0]["prompt"] == (
        "Definition: Summarize the conversation in one sentence.\n\n"
        "Now complete the following example -\n"
        "Input: Ann: Lunch at noon? Ben: Sure, see you then.\nOutput: "
    )
    assert rows[0]["response"] == "Ann and Ben will have lunch at noon."
    spec = DataSpec(
        source={"type": "superni", "root": str(CL), "task": "task875_emotion_classification"}
    )
    assert spec.kind == "instruction" and len(spec.load("eval")) == 4  # test.json
    assert input_files(spec) == [
        (CL / "SuperNI/task875_emotion_classification/train.json").resolve()
    ]
    with pytest.raises(ValueError, match="task999_x: missing; SuperNI tasks under"):
        read_superni(CL, "task999_x", "train")
    with pytest.raises(ValueError, match="SuperNI split 'eval'"):
        read_superni(CL, "task1572_samsum_summary", "eval")


def test_superni_reader_names_bad_files_and_instances(tmp_path):
    folder = tmp_path / "SuperNI" / "task1_x"
    folder.mkdir(parents=True)
    (folder / "train.json").write_text(json.dumps({"Definition": ["d"], "Instances": "no"}))
    with pytest.raises(ValueError, match=r"train\.json: expected a Natural Instructions task"):
        read_superni(tmp_path, "task1_x", "train")
    instances = [{"id": "a", "input": "x", "output": ["y "]}, {"id": "b", "input": "x"}]
    (folder / "train.json").write_text(json.dumps({"Definition": ["d"], "Instances": instances}))
    with pytest.raises(BadRowError, match=r"train\.json, instance 1: field 'output'"):
        read_superni(tmp_path, "task1_x", "train")


def test_lima_in_traces_archive_and_in_its_release():
    """TRACE reads LIMA as a task folder of its archive; the GAIR/lima release is JSON lines of
    conversations: two turns make a prompt and a response, more a chat."""
    traced = read_trace(FIX / "trace", "Lima", "train")
    assert len(traced) == 12 and set(traced[0]) == {"prompt", "response"}
    rows = read_lima(FIX / "lima")
    assert len(rows) == 12
    assert rows[0] == {
        "prompt": "How do I keep basil fresh?",
        "response": "Trim the stems and keep it in a glass of water on the counter.",
    }
    chat = rows[-1]["messages"]
    assert [m["role"] for m in chat] == ["user", "assistant", "user", "assistant"]
    enc = encode_all(rows, "instruction", TOK, 256)
    assert all(e["loss_mask"].sum() > 0 for e in enc)  # every example trains its replies
    spec = DataSpec(source={"type": "lima", "root": str(FIX / "lima")}, eval_size=2)
    assert not spec.source.has_split("eval")
    assert len(spec.load("train")) == 10 and len(spec.load("eval")) == 2  # held out
    assert input_files(spec) == [(FIX / "lima" / "train.jsonl").resolve()]
    with pytest.raises(ValueError, match="LIMA split 'test'.*without responses"):
        read_lima(FIX / "lima", "test")


def test_lima_reader_names_bad_lines(tmp_path):
    (tmp_path / "train.jsonl").write_text(
        '{"conversations": ["q", "a"]}\n{"conversations": ["only a prompt"]}\n'
    )
    with pytest.raises(BadRowError, match=r"train\.jsonl, line 2: field 'conversations' has 1"):
        read_lima(tmp_path)


def _context(index, rows_seen):
    def encode(rows):
        rows_seen.extend(rows)
        return [{"tokens": np.full(4, i, np.int32)} for i in range(len(rows))]

    info = TaskInfo(index, f"t{index}", 2, [], [])
    return Context(info, None, None, None, None, None, {"encode": encode})


def test_replay_general_data_enters_the_memory_at_the_first_task():
    """TRACE's replay of LIMA: the general data is in the memory before the first task's first
    step (so it is mixed in from then on), once, whole or train_size of it."""
    general = {"source": {"type": "lima", "root": str(FIX / "lima")}, "train_size": 5}
    spec = ReplaySpec(name="replay", ratio=0.1, capacity=100, general=general)
    hooks = [h for h in spec.hooks() if h.phase == "task_start"]
    assert len(hooks) == 1
    carry = Carry(None, {}, spec.new_memory(seed=0, n_tasks=3))
    seen = []
    carry = hooks[0].fn(_context(0, seen), carry)
    assert carry.buffer.tasks == [GENERAL] and len(carry.buffer.examples()) == 5
    assert seen == read_lima(FIX / "lima")[:5]
    carry.buffer.add_task("t0", [{"tokens": np.full(4, 9, np.int32)}] * 3)
    carry = hooks[0].fn(_context(1, seen), carry)  # a later task adds nothing
    carry = hooks[0].fn(_context(0, seen), carry)  # a resumed first task neither
    assert carry.buffer.tasks == [GENERAL, "t0"] and len(seen) == 5
    whole = ReplaySpec(name="replay", general={"source": general["source"]})
    buf = ReplayBuffer(100)
    [h for h in whole.hooks() if h.phase == "task_start"][0].fn(
        _context(0, []), Carry(None, {}, buf)
    )
    assert len(buf.examples()) == 12  # no eval held out of the general data


def test_replay_general_is_refused_with_pseudo_or_preferences():
    lima = {"source": {"type": "lima", "root": str(FIX / "lima")}}
    with pytest.raises(ValueError, match="pseudo-replay keeps none"):
        ReplaySpec(name="replay", general=lima, pseudo={})
    with pytest.raises(ValueError, match="preference pairs are not replayed"):
        ReplaySpec(name="replay", general={"bundled": "pref/helpful"})
