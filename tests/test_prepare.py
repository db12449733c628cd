"""``jaxcl prepare``: documents tokenized once into ArrayRecord shards, read back by index.

The oracle is the on-the-fly path: ``encode_documents`` on each source row (and, for the byte
tokenizer, the bytes of the raw text themselves)."""

import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml

from jaxcl.cli import main
from jaxcl.data.budget import document_lengths
from jaxcl.data.pipeline import encode_documents
from jaxcl.data.prepare import (
    MANIFEST,
    PreparedDocs,
    input_files,
    open_prepared,
    prepare_data,
    prepared_path,
    tokenizer_fingerprint,
)
from jaxcl.data.spec import DataSpec
from jaxcl.models.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def _jsonl(path: Path, records: list, raw: dict[int, str] | None = None) -> Path:
    """Write records one per line; ``raw[k]`` replaces line k (0-based) by a literal string."""
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    for k, text in (raw or {}).items():
        lines[k] = text
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _text_records(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    words = ["alpha", "béta", "γάμμα", "delta", "雪", "echo"]
    return [{"body": " ".join(rng.choice(words, rng.integers(1, 40)))} for _ in range(n)]


def _qa_records(n: int) -> list[dict]:
    return [{"q": f"what is {i} + {i}?", "a": str(2 * i)} for i in range(n)]


def _spec(kind: str, train: Path, **extra) -> DataSpec:
    fields = {"text": "body"} if kind == "text" else {"prompt": "q", "response": "a"}
    return DataSpec(
        source={"type": "jsonl", "kind": kind, "train": str(train), "fields": fields}, **extra
    )


@pytest.mark.parametrize("kind", ["text", "instruction"])
def test_round_trip_equals_encode_documents_on_every_row(tmp_path, kind):
    records = _text_records(300) if kind == "text" else _qa_records(300)
    data = _spec(kind, _jsonl(tmp_path / "train.jsonl", records))
    seen = []
    summary = prepare_data(data, TOK, progress=lambda d, t: seen.append((d, t)), shard_bytes=4096)
    docs = open_prepared(data, TOK)
    assert isinstance(docs, PreparedDocs) and len(docs) == 300
    source = data.source.source("train")
    tokens = trained = 0
    for i in range(300):
        ids, mask = docs[i]
        want_ids, want_mask = encode_documents([source[i]], kind, TOK)[0]
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(mask, want_mask)
        assert ids.dtype == np.int32 and mask.dtype == np.int8
        # independent of jaxcl's encoder: bos, the UTF-8 bytes + 3, eos (byte tokenizer)
        r = records[i]
        text = r["body"] if kind == "text" else r["q"] + r["a"]
        raw = [b + 3 for b in text.encode("utf-8")]
        assert ids.tolist() == [1, *raw, 2]
        trained_len = len(raw) + 1 if kind == "text" else len(r["a"].encode()) + 1
        assert mask.tolist() == [0] * (len(ids) - trained_len) + [1] * trained_len
        tokens, trained = tokens + len(ids), trained + int(mask.sum())
    assert (summary.docs, summary.rows, summary.bad_rows) == (300, 300, 0)
    assert (summary.tokens, summary.trained_tokens) == (tokens, trained)
    assert docs.counts == {
        "rows": 300,
        "docs": 300,
        "tokens": tokens,
        "trained_tokens": trained,
        "bad_rows": 0,
    }
    manifest = json.loads((summary.path / MANIFEST).read_text())
    shards = manifest["shards"]
    assert len(shards) > 1 and sum(s["records"] for s in shards) == 300  # 4 KiB shards
    assert sorted(p.name for p in summary.path.glob("*.array_record")) == [
        s["name"] for s in shards
    ]
    first = shards[0]["records"]
    assert docs.where(first + 2) == (
        f"{summary.path / shards[1]['name']}, record 2 (source row {first + 2})"
    )
    assert seen[-1] == (300, 300) and len(seen) == 2  # one call per 256-row chunk
    with pytest.raises(IndexError):
        docs[300]


def test_the_cache_goes_beside_the_data_and_a_folder_source_does_not_read_it(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    _jsonl(folder / "a.jsonl", _text_records(5))
    (folder / "sub").mkdir()
    _jsonl(folder / "sub" / "b.json", _text_records(7))
    data = _spec("text", folder)
    assert prepared_path(data) == (tmp_path / "corpus.jaxcl-prepared").resolve()
    assert input_files(data) == [p.resolve() for p in data.source.reader("train").files]
    prepare_data(data, TOK)
    assert len(data.source.source("train")) == 12  # the manifest is not a JSON-lines input
    assert len(open_prepared(data, TOK)) == 12
    file_data = _spec("text", folder / "a.jsonl")
    assert prepared_path(file_data) == (folder / "a.jsonl.jaxcl-prepared").resolve()


def test_a_trace_task_is_prepared_beside_its_train_file(tmp_path):
    task = tmp_path / "TRACE" / "FOMC"
    task.mkdir(parents=True)
    rows = [{"prompt": f"Is {i} hawkish?", "answer": "yes" if i % 2 else "no"} for i in range(9)]
    (task / "train.json").write_text(json.dumps(rows))
    data = DataSpec(source={"type": "trace", "root": str(tmp_path / "TRACE"), "task": "FOMC"})
    summary = prepare_data(data, TOK)
    assert summary.path == (task / "train.json.jaxcl-prepared").resolve()
    docs = open_prepared(data, TOK)
    for i, example in enumerate(data.source.examples("train")):
        want = encode_documents([example], "instruction", TOK)[0]
        np.testing.assert_array_equal(docs[i][0], want[0])
    (task / "train.json").write_text(json.dumps(rows[:-1]))
    with pytest.raises(ValueError, match="train.json changed"):
        open_prepared(data, TOK)


def test_no_cache_and_unprepared_data_give_none(tmp_path):
    data = _spec("text", _jsonl(tmp_path / "t.jsonl", _text_records(3)))
    assert open_prepared(data, TOK) is None
    memory = DataSpec(source={"type": "memory", "kind": "text", "train": [{"text": "x"}]})
    assert prepared_path(memory) is None and open_prepared(memory, TOK) is None
    assert prepared_path(DataSpec(bundled="cit/capitals")) is None


class ShiftedBytes(ByteTokenizer):
    offset = 4


def _hf_tokenizer(words=("hello", "world")):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "[UNK]": 3}
    vocab.update({w: 4 + i for i, w in enumerate(words)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="[UNK]",
    )


def test_tokenizer_fingerprint_sees_what_changes_the_ids():
    assert tokenizer_fingerprint(ByteTokenizer()) == tokenizer_fingerprint(TOK)
    assert tokenizer_fingerprint(ShiftedBytes()) != tokenizer_fingerprint(TOK)
    hf = _hf_tokenizer()
    assert len(tokenizer_fingerprint(hf)) == 64
    assert tokenizer_fingerprint(hf) == tokenizer_fingerprint(_hf_tokenizer())
    assert tokenizer_fingerprint(_hf_tokenizer(("hello", "there"))) != tokenizer_fingerprint(hf)
    templated = _hf_tokenizer()
    templated.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert tokenizer_fingerprint(templated) != tokenizer_fingerprint(hf)
    assert tokenizer_fingerprint(hf) != tokenizer_fingerprint(TOK)


def test_a_stale_cache_is_refused_naming_the_manifest_and_the_change(tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", _qa_records(20))
    data = _spec("instruction", train)
    manifest = prepare_data(data, TOK).path / MANIFEST
    assert open_prepared(data, TOK) is not None
    with pytest.raises(ValueError, match="tokenizer changed") as info:
        open_prepared(data, ShiftedBytes())
    assert str(manifest) in str(info.value)
    other = DataSpec(
        source={**data.source.model_dump(), "fields": {"prompt": "a", "response": "q"}}
    )
    with pytest.raises(ValueError, match=r"source spec changed: fields") as info:
        open_prepared(other, TOK)
    assert str(manifest) in str(info.value)
    st = train.stat()  # same bytes, newer mtime
    os.utime(train, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with pytest.raises(ValueError, match="modified since it was prepared") as info:
        open_prepared(data, TOK)
    assert str(manifest) in str(info.value) and str(train.resolve()) in str(info.value)
    _jsonl(train, _qa_records(21))  # different content
    with pytest.raises(ValueError, match=r"changed \(size") as info:
        open_prepared(data, TOK)
    assert str(manifest) in str(info.value)
    prepare_data(data, TOK)  # preparing again makes it fresh
    assert len(open_prepared(data, TOK)) == 21


def test_bad_rows_under_skip_are_counted_and_read_as_none(tmp_path):
    records = _qa_records(10)
    records[6] = {"q": "no answer here"}
    train = _jsonl(tmp_path / "train.jsonl", records, raw={3: '{"q": "broken'})
    data = _spec("instruction", train, on_bad_row="skip")
    summary = prepare_data(data, TOK)
    assert (summary.rows, summary.docs, summary.bad_rows) == (10, 8, 2)
    docs = open_prepared(data, TOK)
    assert docs[3] is None and docs[6] is None and docs.counts["bad_rows"] == 2
    for i in set(range(10)) - {3, 6}:
        want = encode_documents(
            [{"prompt": records[i]["q"], "response": records[i]["a"]}], "instruction", TOK
        )[0]
        np.testing.assert_array_equal(docs[i][0], want[0])
    places = json.loads((summary.path / MANIFEST).read_text())["bad_row_places"]
    assert [(p["row"], p["where"]) for p in places] == [
        (3, f"{train}, line 4"),
        (6, f"{train}, line 7"),
    ]
    assert "malformed JSON" in places[0]["problem"] and "'a'" in places[1]["problem"]
    assert docs.where(3).endswith("record 3 (source row 3)")
    strict = _spec("instruction", train)  # the same file read with on_bad_row: error
    with pytest.raises(ValueError, match="on_bad_row: error") as info:
        open_prepared(strict, TOK)
    assert f"{train}, line 4" in str(info.value)


def test_concurrent_reads_from_threads_agree(tmp_path):
    data = _spec("text", _jsonl(tmp_path / "t.jsonl", _text_records(200)))
    prepare_data(data, TOK, shard_bytes=2048)
    docs = open_prepared(data, TOK)
    expected = [docs[i] for i in range(len(docs))]
    order = np.random.default_rng(1).integers(0, len(docs), 4000)
    barrier = threading.Barrier(8)

    def read(chunk):
        barrier.wait()
        return [(int(i), docs[int(i)]) for i in chunk]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(read, np.array_split(order, 8)))
    for chunk in results:
        for i, (ids, mask) in chunk:
            np.testing.assert_array_equal(ids, expected[i][0])
            np.testing.assert_array_equal(mask, expected[i][1])


def _recipe(tmp_path: Path, qa: Path, on_bad_row: str = "error") -> Path:
    """A small recipe: a text task, a bundled one, two instruction tasks over one file."""
    text = _jsonl(tmp_path / "cpt.jsonl", _text_records(30))
    sizes = {"seq_len": 32, "batch_size": 4, "steps_per_task": 2}

    def qa_source():  # fresh dicts: shared ones would be one YAML anchor, edited together
        fields = {"prompt": "q", "response": "a"}
        return {"type": "jsonl", "kind": "instruction", "train": str(qa), "fields": fields}

    web = {"type": "jsonl", "kind": "text", "train": str(text), "fields": {"text": "body"}}
    recipe = {
        "name": "tiny-prepare",
        "out_dir": str(tmp_path / "run"),
        "model": {"preset": "tiny"},
        "stages": [
            {
                "name": "cpt",
                "kind": "pretrain",
                **sizes,
                "tasks": [
                    {"name": "web", "data": {"source": web}},
                    {"name": "gen", "data": {"bundled": "cpt/recipes"}},
                ],
            },
            {
                "name": "cit",
                "kind": "instruct",
                **sizes,
                "tasks": [
                    {"name": "qa", "data": {"on_bad_row": on_bad_row, "source": qa_source()}},
                    {"name": "qa_again", "data": {"source": qa_source()}},
                ],
            },
        ],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_cli_prepares_a_tiny_recipe_once_per_data(tmp_path, capsys):
    qa = _jsonl(tmp_path / "qa.jsonl", _qa_records(40))
    recipe = _recipe(tmp_path, qa)
    assert main(["prepare", str(recipe)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("cpt/web: 30 docs,") and "0 bad rows" in lines[0]
    assert lines[1] == "cpt/gen: not prepared (bundled (generated) data)"
    assert (
        lines[2].startswith("cit/qa: 40 docs,")
        and str(qa.resolve()) + ".jaxcl-prepared" in lines[2]
    )
    assert lines[3].startswith("cit/qa_again: 40 docs,")  # the same cache, prepared once
    manifest = json.loads((tmp_path / "qa.jsonl.jaxcl-prepared" / MANIFEST).read_text())
    assert manifest["counts"]["docs"] == 40 and manifest["kind"] == "instruction"
    assert (tmp_path / "cpt.jsonl.jaxcl-prepared" / MANIFEST).is_file()
    assert main(["prepare", str(recipe), "stages.0.steps_per_task=3"]) == 0  # overrides pass
    assert capsys.readouterr().out.count("[up to date]") == 3


def test_cli_bad_row_under_error_exits_2_naming_file_and_line_and_leaves_nothing(tmp_path):
    qa = _jsonl(tmp_path / "qa.jsonl", _qa_records(12), raw={8: "not json"})
    recipe = _recipe(tmp_path, qa)
    proc = subprocess.run(
        [sys.executable, "-m", "jaxcl.cli", "prepare", str(recipe)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert f"{qa}, line 9: malformed JSON" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("qa.jsonl.jaxcl-prepared*"))  # no cache, no temporary folder


def test_cli_refuses_two_specs_over_one_file(tmp_path, capsys):
    qa = _jsonl(tmp_path / "qa.jsonl", _qa_records(5))
    recipe = _recipe(tmp_path, qa)
    assert main(["prepare", str(recipe), "stages.1.tasks.1.data.source.fields.prompt=a"]) == 2
    err = capsys.readouterr().err
    assert "cit/qa and cit/qa_again" in err and "different source specs" in err


def test_prepare_help_has_examples(capsys):
    with pytest.raises(SystemExit) as info:
        main(["prepare", "--help"])
    assert info.value.code == 0 and "example" in capsys.readouterr().out


def test_prepared_lengths_equal_a_count_of_the_tokenized_documents(tmp_path):
    """An epoch budget of a packed stage reads the documents' lengths from the shards; they
    must equal a count of the same rows tokenized afresh (held-out eval rows left out)."""
    train = _jsonl(tmp_path / "c.jsonl", _text_records(60), raw={17: "{not json"})
    spec = _spec("text", train, eval_size=7, on_bad_row="skip")
    fresh = spec.documents(TOK, 16)
    counted = document_lengths(fresh)
    prepare_data(spec, TOK)
    prepared = spec.documents(TOK, 16)
    assert type(prepared).__name__ == "PreparedDocuments"
    got = prepared.lengths()
    assert got is not None and got.shape == (len(fresh),) == (53,)
    np.testing.assert_array_equal(got, counted)
    assert (got == 0).sum() == 1  # the bad row, skipped
