"""Every stage's data is checked before the first step: a bad file of a later stage, or a task
whose rows cut at ``seq_len`` keep no trained token, stops the run before anything trains."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

from jaxcl.data.pipeline import encode_all
from jaxcl.models.tokenizer import ByteTokenizer
from jaxcl.recipe import load_recipe
from jaxcl.train.data import DataError, check_stage_data, first_trained

ROOT = Path(__file__).parent.parent
TOK = ByteTokenizer()


def _jsonl(path: Path, rows: list, raw: dict[int, str] | None = None) -> Path:
    lines = [json.dumps(r) for r in rows]
    for i, text in (raw or {}).items():
        lines[i] = text
    path.write_text("\n".join(lines) + "\n")
    return path


def _qa(n: int, prompt_words: int = 3) -> list[dict]:
    return [
        {"prompt": " ".join(["ask"] * prompt_words) + f" {i}", "response": f"r{i}"}
        for i in range(n)
    ]


def _recipe(tmp_path: Path, second: Path, seq_len: int = 48) -> Path:
    first = _jsonl(tmp_path / "first.jsonl", _qa(40))
    recipe = {
        "name": "checked",
        "out_dir": str(tmp_path / "run"),
        "model": {"preset": "test-micro"},
        "probes": False,
        "stages": [
            {
                "name": "one",
                "kind": "instruct",
                "seq_len": 48,
                "batch_size": 4,
                "steps_per_task": 2,
                "tasks": [{"name": "a", "data": {"source": _source(first), "eval_size": 4}}],
            },
            {
                "name": "two",
                "kind": "instruct",
                "seq_len": seq_len,
                "batch_size": 4,
                "steps_per_task": 2,
                "tasks": [{"name": "b", "data": {"source": _source(second), "eval_size": 4}}],
            },
        ],
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _source(path: Path) -> dict:
    return {"type": "jsonl", "kind": "instruction", "train": str(path)}


def _run(recipe: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "jaxcl.cli", "run", str(recipe)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_first_trained_is_the_shortest_row_that_keeps_a_response_token():
    """Oracle: the rows encode_all itself cuts at seq_len n keep a trained token, at n - 1 none."""
    examples = _qa(3, prompt_words=5)
    needs = first_trained(encode_all(examples, "instruction", TOK, None))
    for example, n in zip(examples, needs):
        assert encode_all([example], "instruction", TOK, n)[0]["loss_mask"].sum() >= 1
        assert encode_all([example], "instruction", TOK, n - 1)[0]["loss_mask"].sum() == 0
    pair = {"prompt": "abcdefgh", "chosen": "x", "rejected": "yz"}
    n = first_trained(encode_all([pair], "preference", TOK, None))[0]
    cut = encode_all([pair], "preference", TOK, n)[0]
    assert cut["chosen_mask"].sum() >= 1 and cut["rejected_mask"].sum() >= 1
    shorter = encode_all([pair], "preference", TOK, n - 1)[0]
    assert shorter["chosen_mask"].sum() == 0 or shorter["rejected_mask"].sum() == 0


def test_a_bad_file_of_the_second_stage_stops_the_run_before_the_first_trains(tmp_path):
    second = _jsonl(tmp_path / "second.jsonl", _qa(40), raw={3: '{"prompt": "x", "response": '})
    proc = _run(_recipe(tmp_path, second))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "stage two, task b" in proc.stderr and "second.jsonl, line 4" in proc.stderr
    assert not (tmp_path / "run/checkpoints").exists()  # stage one did not train


def test_a_task_with_no_trained_token_at_its_seq_len_is_refused_naming_what_it_needs(tmp_path):
    second = _jsonl(tmp_path / "second.jsonl", _qa(40, prompt_words=20))
    recipe = load_recipe(_recipe(tmp_path, second, seq_len=32))
    needs = first_trained(
        encode_all(recipe.stages[1].tasks[0].data.sample(16), "instruction", TOK, None)
    )
    try:
        check_stage_data(recipe.stages[1], TOK)
    except DataError as err:
        message = str(err)
    else:
        raise AssertionError("a stage that trains no token was accepted")
    assert "stage two, task b" in message and "seq_len 32" in message
    assert f"seq_len {max(needs)} keeps one" in message and min(needs) > 32
    warnings = []  # at the seq_len it names, every sampled row trains
    check_stage_data(
        recipe.stages[1].model_copy(update={"seq_len": max(needs)}), TOK, warnings.append
    )
    assert warnings == []
    proc = _run(_recipe(tmp_path, second, seq_len=32))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no signal" in proc.stderr and not (tmp_path / "run/checkpoints").exists()


def test_some_rows_without_a_trained_token_are_counted_in_a_warning(tmp_path):
    rows = _qa(12, prompt_words=20) + _qa(28)
    second = _jsonl(tmp_path / "second.jsonl", rows)
    recipe = load_recipe(_recipe(tmp_path, second, seq_len=32))
    warnings = []
    check_stage_data(recipe.stages[1], TOK, warnings.append)
    assert len(warnings) == 1 and "12 of the first 16 examples" in warnings[0]


def test_a_one_line_source_is_refused_naming_stage_and_task(tmp_path):
    """A corpus that is one long line (a JSON array written as JSON lines) holds one example:
    holding out the eval rows would leave none; the message names where it was found."""
    second = tmp_path / "second.jsonl"
    second.write_text(json.dumps({"prompt": "x " * 200_000, "response": "y"}) + "\n")
    recipe = load_recipe(_recipe(tmp_path, second))
    try:
        check_stage_data(recipe.stages[1], TOK)
    except DataError as err:
        message = str(err)
    else:
        raise AssertionError("a one-example source was accepted")
    assert message.startswith("stage two, task b: ") and "1 training examples" in message
