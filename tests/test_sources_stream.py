"""Streaming file sources: the chunked JSONL index, lazy Parquet row groups, BadRowError, sample.

Oracles: a naive Python split of the raw bytes (JSONL) and ``pq.read_table(...).to_pylist()``
(Parquet); row-group reads are counted by patching pyarrow itself.
"""

import json
import pickle
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from jaxcl.data.sources import (
    BadRowError,
    ExampleSource,
    FieldMap,
    JsonlReader,
    MemoryReader,
    ParquetReader,
    index_lines,
)

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def naive_index(data: bytes) -> list[tuple[int, int, int]]:
    """``(start, end, line)`` of the non-blank lines, by a plain split on ``\\n``."""
    out, start = [], 0
    for line_no, line in enumerate(data.split(b"\n"), start=1):
        if line.strip():
            out.append((start, start + len(line), line_no))
        start += len(line) + 1
    return out


def _messy_bytes(seed: int) -> bytes:
    """JSON lines with blank, whitespace-only, CRLF and long lines, no final newline."""
    rng = random.Random(seed)
    parts = []
    for i in range(300):
        kind = rng.random()
        if kind < 0.15:
            parts.append(rng.choice(["", " ", "\t", "\r", " \t \x0b\x0c "]))
        elif kind < 0.25:
            parts.append(json.dumps({"text": "x" * rng.randrange(100, 400), "i": i}) + "\r")
        else:
            parts.append("  " * rng.randrange(2) + json.dumps({"text": f"row {i} é"}))
    return "\n".join(parts).encode("utf-8")


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000, 1 << 20])
@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\n\n \n",
        b'{"a": 1}',
        b'{"a": 1}\n',
        b'\n\n{"a": 1}\r\n  \r\n{"b": 2}\n\n{"c": 3}',
        b" " * 200 + b'{"a": 1}' + b" " * 200,
        b"x" * 130 + b"\n" + b" " * 130 + b"\n" + b"y" * 64,
    ],
    ids=["empty", "only-blank", "no-newline", "one", "crlf-mixed", "padded", "long-lines"],
)
def test_index_equals_naive_split(tmp_path, data, chunk):
    path = tmp_path / "d.jsonl"
    path.write_bytes(data)
    got = index_lines(path, chunk_bytes=chunk)
    assert got.dtype == np.int64 and got.shape[1] == 3
    assert [tuple(r) for r in got.tolist()] == naive_index(data)


@pytest.mark.parametrize("chunk", [64, 333])
def test_reader_over_folder_matches_oracle_records(tmp_path, chunk):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    files = [folder / "a.jsonl", folder / "sub" / "b.jsonl", folder / "c.json"]
    for seed, file in enumerate(files):
        file.write_bytes(_messy_bytes(seed))
    reader = JsonlReader(folder, chunk_bytes=chunk)
    assert reader.files == sorted(files)  # a.jsonl, c.json, sub/b.jsonl
    expected, places = [], []
    for file in sorted(files):
        data = file.read_bytes()
        for start, end, line in naive_index(data):
            expected.append(json.loads(data[start:end]))
            places.append(f"{file}, line {line}")
    assert len(reader) == len(expected) > 600
    assert [reader[i] for i in range(len(reader))] == expected
    assert [reader.where(i) for i in range(len(reader))] == places
    assert reader._index.dtype == np.int64 and reader._index.shape == (len(reader), 4)


def test_malformed_line_deep_in_a_file_raises_bad_row(tmp_path):
    lines = [json.dumps({"text": f"row {i}"}) for i in range(1, 10_001)]
    lines[4999] = '{"text": "row 5000",,}'
    path = tmp_path / "deep.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    source = ExampleSource(JsonlReader(path, chunk_bytes=4096), "text")
    assert len(source) == 10_000
    assert source.sample(3) == [{"text": "row 1"}, {"text": "row 2"}, {"text": "row 3"}]
    assert len(source.sample(4999)) == 4999  # stops before the bad line
    with pytest.raises(BadRowError) as info:
        source.sample(10**9)
    assert info.value.where == f"{path}, line 5000"
    assert str(info.value).startswith(f"{path}, line 5000: malformed JSON (")
    assert source[5000] == {"text": "row 5001"}  # the rows after it still read


def test_non_utf8_bytes_raise_bad_row_with_the_line(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"text": "ok"}\n\n{"text": "caf\xe9"}\n')
    reader = JsonlReader(path)
    assert reader[0] == {"text": "ok"}
    with pytest.raises(BadRowError, match=r"latin\.jsonl, line 3: not UTF-8 text \(") as info:
        reader[1]
    assert info.value.where == f"{path}, line 3"


def test_utf8_bom_on_the_first_line_is_ignored(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n{"text": "b"}\n')
    assert [r["text"] for r in JsonlReader(path)] == ["a", "b"]


def _parquet_corpus(folder: Path) -> list[Path]:
    folder.mkdir()
    rng = np.random.default_rng(0)
    files = []
    for f, rows in enumerate([23, 1, 40]):
        ids = list(range(f * 100, f * 100 + rows))
        table = pa.table(
            {
                "text": [f"doc {i}" if i % 9 else None for i in ids],
                "n": rng.integers(0, 1000, rows).tolist(),
                "meta": [{"src": f"s{i % 3}", "score": i / 7} for i in ids],
                "tags": [[f"t{j}" for j in range(i % 4)] for i in ids],
            }
        )
        path = folder / f"part-{f}.parquet"
        pq.write_table(table, path, row_group_size=7)
        files.append(path)
    return files


def _oracle(files: list[Path]) -> list[dict]:
    return [row for file in files for row in pq.read_table(file).to_pylist()]


def test_parquet_rows_equal_read_table_across_row_groups_and_files(tmp_path):
    files = _parquet_corpus(tmp_path / "pq")
    assert [pq.ParquetFile(f).num_row_groups for f in files] == [4, 1, 6]
    reader = ParquetReader(tmp_path / "pq")
    expected = _oracle(files)
    assert len(reader) == len(expected) == 64
    order = list(range(len(reader)))
    random.Random(1).shuffle(order)
    assert [reader[i] for i in order] == [expected[i] for i in order]
    assert reader.where(23) == f"{files[1]}, row 0"
    assert reader.where(63) == f"{files[2]}, row 39"
    with pytest.raises(IndexError):
        reader[64]
    restored = pickle.loads(pickle.dumps(reader))
    assert [restored[i] for i in range(len(restored))] == expected


def _count_group_reads(monkeypatch) -> list[int]:
    """Patch pyarrow so that every row group decoded is recorded (by its index in its file)."""
    reads: list[int] = []
    original = pq.ParquetFile.read_row_group

    def counted(self, i, *args, **kwargs):
        reads.append(i)
        return original(self, i, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counted)
    return reads


def test_nothing_is_decoded_up_front_and_sequential_reads_decode_each_group_once(
    tmp_path, monkeypatch
):
    _parquet_corpus(tmp_path / "pq")
    reads = _count_group_reads(monkeypatch)
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("read a whole table"))
    source = ExampleSource(ParquetReader(tmp_path / "pq"), "text", FieldMap({"text": "meta.src"}))
    assert reads == []  # opening and the schema check read footers only
    ids = [*range(0, 23), 100, *range(200, 240)]
    assert [source[i]["text"] for i in range(len(source))] == [f"s{i % 3}" for i in ids]
    assert reads == [0, 1, 2, 3, 0, 0, 1, 2, 3, 4, 5]  # 4 + 1 + 6 row groups, once each
    assert source.reader.group_reads == 11


def test_schema_errors_come_from_footers_and_stay_plain_value_errors(tmp_path, monkeypatch):
    _parquet_corpus(tmp_path / "pq")
    reads = _count_group_reads(monkeypatch)
    reader = ParquetReader(tmp_path / "pq")
    with pytest.raises(ValueError, match=r"part-0\.parquet: column 'body' \(the text\) is missing"):
        ExampleSource(reader, "text", FieldMap({"text": "body"}))
    with pytest.raises(ValueError, match=r"column 'n' \(the text\) has type int64") as info:
        ExampleSource(reader, "text", FieldMap({"text": "n"}))
    assert not isinstance(info.value, BadRowError) and reads == []
    with pytest.raises(BadRowError, match=r"part-0\.parquet, row 0: field 'text' .* is null"):
        ExampleSource(reader, "text").sample(5)


def test_parquet_column_projection(tmp_path):
    files = _parquet_corpus(tmp_path / "pq")
    reader = ParquetReader(tmp_path / "pq", columns=["text", "n"])
    expected = [{"text": r["text"], "n": r["n"]} for r in _oracle(files)]
    assert [reader[i] for i in range(len(reader))] == expected
    with pytest.raises(ValueError, match=r"part-0\.parquet: column 'nope' is missing"):
        ParquetReader(tmp_path / "pq", columns=["nope"])


def test_eight_threads_read_the_same_records(tmp_path):
    files = _parquet_corpus(tmp_path / "pq")
    parquet, expected_pq = ParquetReader(tmp_path / "pq"), _oracle(files)
    path = tmp_path / "t.jsonl"
    data = _messy_bytes(7)
    path.write_bytes(data)
    jsonl = JsonlReader(path, chunk_bytes=100)
    expected_jl = [json.loads(data[s:e]) for s, e, _ in naive_index(data)]
    for reader, expected in ((parquet, expected_pq), (jsonl, expected_jl)):
        order = [i for _ in range(5) for i in range(len(reader))]
        random.Random(3).shuffle(order)
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(reader.__getitem__, order, chunksize=3))
        assert got == [expected[i] for i in order]


def test_threads_asking_for_one_row_group_together_decode_it_once(tmp_path, monkeypatch):
    _parquet_corpus(tmp_path / "pq")
    reader = ParquetReader(tmp_path / "pq")
    reads = _count_group_reads(monkeypatch)
    barrier = threading.Barrier(8)

    def read(i):
        barrier.wait()
        return reader[i]

    with ThreadPoolExecutor(8) as pool:
        # rows 0..6 of part-2 (and row 0 again): all in its first row group
        got = list(pool.map(read, [*range(24, 31), 24]))
    rows = pq.read_table(tmp_path / "pq" / "part-2.parquet").to_pylist()
    assert got == [*rows[:7], rows[0]]
    assert reads == [0] and reader.group_reads == 1


@pytest.mark.parametrize(
    "kind, record, fm, problem",
    [
        ("text", {"body": "x"}, FieldMap(), r"field 'text' \(the text\) is missing"),
        ("text", {"text": None}, FieldMap(), r"field 'text' \(the text\) is null"),
        ("text", {"text": 3}, FieldMap(), r"field 'text' \(the text\) must be a string, got int"),
        ("text", [1], FieldMap(), r"a record must be an object, got list"),
        (
            "instruction",
            {"prompt": "p", "y": 5},
            FieldMap({"label": "y"}, label_names=["neg", "pos"]),
            r"field 'y' \(the label\) is 5, outside the 2 label_names",
        ),
        (
            "instruction",
            {"prompt": "p", "label": True},
            FieldMap(),
            r"field 'label' \(the label\) must be an integer or a string",
        ),
        (
            "instruction",
            {"prompt": "p", "choices": ["a", "b"], "label": 2},
            FieldMap({"label": "label"}),
            r"field 'label' \(the label\) is 2, outside the 2 choices",
        ),
        ("instruction", {"messages": []}, FieldMap(), r"field 'messages' must be a non-empty"),
        (
            "instruction",
            {"messages": [{"role": "user", "content": "hi"}]},
            FieldMap(),
            r"field 'messages' has no assistant message",
        ),
        (
            "instruction",
            {"messages": [{"role": "bot", "content": "hi"}]},
            FieldMap(),
            r"field 'messages\[0\]\.role' must be one of",
        ),
        (
            "preference",
            {"prompt": "p", "chosen": " same", "rejected": "same "},
            FieldMap(),
            r"chosen and rejected are identical",
        ),
    ],
)
def test_every_row_problem_is_a_bad_row_error(kind, record, fm, problem):
    source = ExampleSource(MemoryReader([record], "mem"), kind, fm)
    with pytest.raises(BadRowError, match=rf"^mem, row 0: {problem}") as info:
        source[0]
    assert info.value.where == "mem, row 0"
    copy = pickle.loads(pickle.dumps(info.value))  # Grain workers pickle exceptions
    assert type(copy) is BadRowError and copy.where == info.value.where
    assert str(copy) == str(info.value)


def test_prompt_template_that_does_not_fit_a_row_is_a_bad_row_error():
    fm = FieldMap({"response": "a"}, prompt_template="Q: {q[text]}")
    source = ExampleSource(MemoryReader([{"q": "flat", "a": "b"}], "mem"), "instruction", fm)
    with pytest.raises(BadRowError, match=r"^mem, row 0: prompt_template cannot be filled"):
        source[0]


def test_source_errors_stay_plain_value_errors(tmp_path):
    for make in (
        lambda: JsonlReader(tmp_path / "missing.jsonl"),
        lambda: ExampleSource(MemoryReader([], "mem"), "text"),
        lambda: ExampleSource(MemoryReader([{}], "mem"), "poetry"),
    ):
        with pytest.raises(ValueError) as info:
            make()
        assert not isinstance(info.value, BadRowError)


def test_sample_is_bounded_by_the_length():
    source = ExampleSource(MemoryReader([{"text": "a"}, {"text": "b"}]), "text")
    assert source.sample(0) == []
    assert source.sample(5) == [{"text": "a"}, {"text": "b"}]
    with pytest.raises(ValueError, match="n must be >= 0"):
        source.sample(-1)


def test_jsonl_reader_pickles_and_reopens(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n', encoding="utf-8")
    reader = JsonlReader(path)
    assert reader[1] == {"text": "b"}
    copy = pickle.loads(pickle.dumps(reader))
    reader.close()
    assert [copy[i] for i in range(len(copy))] == [{"text": "a"}, {"text": "b"}]
    assert reader[0] == {"text": "a"}  # reopened after close
    assert copy.where(1) == f"{path}, line 3"
