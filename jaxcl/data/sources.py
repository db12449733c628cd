"""Grain data sources over real files: JSON lines, JSON arrays, Parquet, TFDS and in-memory lists.

Every source is random access (``len`` and ``[i]``) so that it feeds ``grain.MapDataset.source``.
A *reader* yields raw records and knows where each one came from (``file, line 12``,
``file, row 7``); :class:`ExampleSource` maps raw records to canonical examples of one kind
through a :class:`FieldMap`, and every error it raises names the place and the field::

    data.jsonl, line 3: malformed JSON (Expecting ',' delimiter at column 17)
    data.jsonl, line 8: field 'question' (the prompt) is missing; the record has ['answer', 'id']
    train.parquet: column 'prompt' (the prompt) has type int64, expected a string column

Canonical examples: ``{text}`` (kind ``text``), ``{prompt, response}`` or ``{messages}``
(kind ``instruction``; a multiple-choice one adds ``choices``, a list of strings holding the
response, and an integer ``label`` then indexes it), ``{prompt, chosen, rejected}`` (kind
``preference``).
"""

from __future__ import annotations

import json
import mmap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grain
import numpy as np

from jaxcl.data.tokenize import check_messages

CANONICAL = {
    "text": ("text",),
    "instruction": ("prompt", "response", "messages", "label", "choices"),
    "preference": ("prompt", "chosen", "rejected"),
}


def _files(path: str | Path, suffixes: tuple[str, ...], what: str) -> list[Path]:
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(suffixes))
        if not files:
            raise ValueError(f"{path}: the folder holds no {what} files ({', '.join(suffixes)})")
        return files
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder")
    return [path]


class JsonlReader:
    """JSON lines from a file or every ``*.jsonl`` / ``*.json`` file under a folder (sorted).

    Line offsets are indexed up front (blank lines skipped); a record is parsed when read.
    """

    def __init__(self, path: str | Path) -> None:
        self.files = _files(path, (".jsonl", ".json"), "JSON lines")
        self._maps: list[bytes | mmap.mmap] = []
        index = []
        for f, file in enumerate(self.files):
            with file.open("rb") as fh:
                size = file.stat().st_size
                data = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
            self._maps.append(data)
            start, line = 0, 1
            while start < size:
                end = data.find(b"\n", start)
                end = size if end < 0 else end
                if data[start:end].strip():
                    index.append((f, start, end, line))
                start, line = end + 1, line + 1
        self._index = np.asarray(index, np.int64).reshape(-1, 4)

    def __len__(self) -> int:
        return len(self._index)

    def where(self, i: int) -> str:
        f, _, _, line = self._index[i]
        return f"{self.files[f]}, line {line}"

    def __getitem__(self, i: int) -> Any:
        f, start, end, _ = (int(x) for x in self._index[i])
        raw = self._maps[f][start:end]
        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{self.where(i)}: malformed JSON ({e.msg} at column {e.colno})"
            ) from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.where(i)}: not UTF-8 text ({e.reason})") from None


class JsonArrayReader:
    """Records of JSON files that each hold one array of objects (the TRACE / O-LoRA layout)."""

    def __init__(self, path: str | Path) -> None:
        self.files = _files(path, (".json",), "JSON")
        self._records: list[Any] = []
        self._where: list[tuple[int, int]] = []
        for f, file in enumerate(self.files):
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{file}, line {e.lineno}: malformed JSON ({e.msg} at column {e.colno})"
                ) from None
            if not isinstance(data, list):
                raise ValueError(
                    f"{file}: expected a JSON array of records, got {type(data).__name__}"
                )
            self._records += data
            self._where += [(f, r) for r in range(len(data))]

    def __len__(self) -> int:
        return len(self._records)

    def where(self, i: int) -> str:
        f, r = self._where[i]
        return f"{self.files[f]}, record {r}"

    def __getitem__(self, i: int) -> Any:
        return self._records[i]


_STRING_TYPES = ("string", "large_string", "string_view")


class ParquetReader:
    """Rows of a Parquet file, or of every ``*.parquet`` under a folder (sorted)."""

    def __init__(self, path: str | Path) -> None:
        import pyarrow.parquet as pq

        self.files = _files(path, (".parquet",), "Parquet")
        self._tables = []
        for file in self.files:
            try:
                self._tables.append(pq.read_table(file))
            except Exception as e:  # pyarrow raises several types for a bad file
                raise ValueError(f"{file}: not a readable Parquet file ({e})") from None
        self._starts = np.cumsum([0] + [t.num_rows for t in self._tables])
        self._rows: list[list[dict[str, Any]] | None] = [None] * len(self._tables)

    def check_columns(self, columns: Mapping[str, str]) -> None:
        """Every mapped column exists in every file, with a string (or chat list) type."""
        for file, table in zip(self.files, self._tables):
            schema = table.schema
            for canonical, column in columns.items():
                top = column.split(".")[0]
                if top not in schema.names:
                    raise ValueError(
                        f"{file}: column {top!r} (the {canonical}) is missing; "
                        f"columns: {', '.join(schema.names)}"
                    )
                kind = str(schema.field(top).type)
                if "." in column or canonical == "label":
                    continue
                listed = canonical in ("messages", "choices")
                ok = kind.startswith(("list<", "large_list<")) if listed else kind in _STRING_TYPES
                if not ok:
                    expected = {"messages": "a list of {role, content}", "choices": "a list"}.get(
                        canonical, "a string"
                    )
                    raise ValueError(
                        f"{file}: column {top!r} (the {canonical}) has type {kind}, "
                        f"expected {expected} column"
                    )

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, i: int) -> tuple[int, int]:
        f = int(np.searchsorted(self._starts, i, side="right")) - 1
        return f, i - int(self._starts[f])

    def where(self, i: int) -> str:
        f, r = self._locate(i)
        return f"{self.files[f]}, row {r}"

    def __getitem__(self, i: int) -> Any:
        f, r = self._locate(i)
        if self._rows[f] is None:
            self._rows[f] = self._tables[f].to_pylist()
        return self._rows[f][r]


def _decode(value: Any) -> Any:
    """TFDS gives bytes and numpy values: turn them into str / Python values."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "SO":
            return [_decode(v) for v in value.tolist()]
        return value.item() if value.ndim == 0 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


class TfdsReader:
    """A split of a TFDS dataset through its Grain data source (array_record, no TensorFlow).

    Give ``name`` (with ``data_dir`` where it was prepared) or ``builder_dir`` (a prepared
    dataset folder, ``.../name/config/version``).
    """

    def __init__(
        self,
        *,
        split: str,
        name: str | None = None,
        data_dir: str | None = None,
        builder_dir: str | None = None,
    ) -> None:
        import tensorflow_datasets as tfds

        if (name is None) == (builder_dir is None):
            raise ValueError("tfds: give exactly one of name or builder_dir")
        self.label = f"tfds {name or builder_dir}[{split}]"
        try:
            if builder_dir is not None:
                builder = tfds.builder_from_directory(builder_dir)
                self._source = builder.as_data_source(split=split)
            else:
                self._source = tfds.data_source(name, split=split, data_dir=data_dir)
        except Exception as e:
            raise ValueError(f"{self.label}: cannot open the dataset ({e})") from None

    def __len__(self) -> int:
        return len(self._source)

    def where(self, i: int) -> str:
        return f"{self.label}, row {i}"

    def __getitem__(self, i: int) -> Any:
        return _decode(self._source[i])


class MemoryReader:
    """An in-memory list of records."""

    def __init__(self, records: Sequence[Any], label: str = "in-memory data") -> None:
        self._records, self.label = list(records), label

    def __len__(self) -> int:
        return len(self._records)

    def where(self, i: int) -> str:
        return f"{self.label}, row {i}"

    def __getitem__(self, i: int) -> Any:
        return self._records[i]


@dataclass(frozen=True)
class FieldMap:
    """Which source field holds each canonical field, plus optional prompt formatting.

    ``fields`` maps canonical names (``text``, ``prompt``, ``response``, ``messages``, ``label``,
    ``chosen``, ``rejected``) to source field names (``a.b`` reaches into nested objects); an
    unmapped canonical field is read from the field of the same name. ``prompt_template`` (a
    ``str.format`` template over the record's fields, e.g. ``"Review: {text}\\nSentiment:"``)
    builds the prompt instead. For classification data, ``label`` is the response: an integer
    label becomes ``label_names[label]`` (or its decimal string without names).
    """

    fields: Mapping[str, str] = field(default_factory=dict)
    prompt_template: str | None = None
    label_names: Sequence[str] | None = None

    def column(self, canonical: str) -> str:
        return self.fields.get(canonical, canonical)


def _get(record: dict[str, Any], path: str, canonical: str, where: str) -> Any:
    value: Any = record
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            have = sorted(value) if isinstance(value, dict) else type(value).__name__
            raise ValueError(
                f"{where}: field {path!r} (the {canonical}) is missing; the record has {have}"
            )
        value = value[part]
    if value is None:
        raise ValueError(f"{where}: field {path!r} (the {canonical}) is null")
    return value


def _string(record: dict[str, Any], fm: FieldMap, canonical: str, where: str) -> str:
    path = fm.column(canonical)
    value = _get(record, path, canonical, where)
    if not isinstance(value, str):
        raise ValueError(
            f"{where}: field {path!r} (the {canonical}) must be a string, "
            f"got {type(value).__name__} {value!r:.60}"
        )
    return value


def _prompt(record: dict[str, Any], fm: FieldMap, where: str) -> str:
    if fm.prompt_template is None:
        return _string(record, fm, "prompt", where)
    try:
        return fm.prompt_template.format_map(record)
    except KeyError as e:
        raise ValueError(
            f"{where}: field {e.args[0]!r} (used by prompt_template) is missing; "
            f"the record has {sorted(record)}"
        ) from None


def _choices(record: dict[str, Any], fm: FieldMap, where: str) -> list[str] | None:
    """A multiple-choice example's options (``None`` when the record has none)."""
    if "choices" not in fm.fields and "choices" not in record:
        return None
    path = fm.column("choices")
    value = _get(record, path, "choices", where)
    if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
        raise ValueError(
            f"{where}: field {path!r} (the choices) must be a non-empty list of strings, "
            f"got {value!r:.60}"
        )
    return list(value)


def _label(
    record: dict[str, Any], fm: FieldMap, where: str, choices: list[str] | None = None
) -> str:
    path = fm.column("label")
    value = _get(record, path, "label", where)
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(
            f"{where}: field {path!r} (the label) must be an integer or a string, got {value!r}"
        )
    if isinstance(value, int) and choices is not None:
        if not 0 <= value < len(choices):
            raise ValueError(
                f"{where}: field {path!r} (the label) is {value}, outside the {len(choices)} "
                "choices"
            )
        return choices[value]
    if isinstance(value, int) and fm.label_names is not None:
        if not 0 <= value < len(fm.label_names):
            raise ValueError(
                f"{where}: field {path!r} (the label) is {value}, outside the "
                f"{len(fm.label_names)} label_names"
            )
        return str(fm.label_names[value])
    return str(value)


def normalize(record: Any, kind: str, fm: FieldMap, where: str) -> dict[str, Any]:
    """The canonical example of ``kind`` held by a raw ``record``."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a record must be an object, got {type(record).__name__}")
    if kind == "text":
        return {"text": _string(record, fm, "text", where)}
    if kind == "instruction":
        chat = "messages" in fm.fields or (
            "prompt" not in fm.fields and fm.prompt_template is None and "messages" in record
        )
        if chat:
            messages = _get(record, fm.column("messages"), "messages", where)
            return {"messages": check_messages(messages, where)}
        prompt = _prompt(record, fm, where)
        choices = _choices(record, fm, where)
        uses_label = "label" in fm.fields or (
            "response" not in fm.fields and "label" in record and "response" not in record
        )
        response = (
            _label(record, fm, where, choices)
            if uses_label
            else _string(record, fm, "response", where)
        )
        if choices is None:
            return {"prompt": prompt, "response": response}
        if response not in choices:
            raise ValueError(
                f"{where}: the response {response!r:.60} is not one of the choices {choices!r:.120}"
            )
        return {"prompt": prompt, "response": response, "choices": choices}
    if kind == "preference":
        row = {
            "prompt": _prompt(record, fm, where),
            "chosen": _string(record, fm, "chosen", where),
            "rejected": _string(record, fm, "rejected", where),
        }
        if row["chosen"].strip() == row["rejected"].strip():
            raise ValueError(
                f"{where}: chosen and rejected are identical ({row['chosen'].strip()[:60]!r}); "
                "a preference pair needs two different responses"
            )
        return row
    raise ValueError(f"unknown example kind {kind!r}; valid kinds: text, instruction, preference")


class ExampleSource(grain.sources.RandomAccessDataSource):
    """Canonical examples of one kind over a reader; feed it to ``grain.MapDataset.source``."""

    def __init__(self, reader: Any, kind: str, fields: FieldMap | None = None) -> None:
        if kind not in CANONICAL:
            raise ValueError(
                f"unknown example kind {kind!r}; valid kinds: text, instruction, preference"
            )
        fm = fields or FieldMap()
        unknown = set(fm.fields) - set(CANONICAL[kind])
        if unknown:
            raise ValueError(
                f"fields: {', '.join(sorted(unknown))} cannot be mapped for {kind} data; "
                f"valid names: {', '.join(CANONICAL[kind])}"
            )
        if len(reader) == 0:
            files = getattr(reader, "files", None)
            place = ", ".join(map(str, files)) if files else getattr(reader, "label", "source")
            raise ValueError(f"{place}: the dataset is empty")
        if isinstance(reader, ParquetReader):
            reader.check_columns(_required_columns(kind, fm))
        self.reader, self.kind, self.fields = reader, kind, fm

    def __len__(self) -> int:
        return len(self.reader)

    def where(self, i: int) -> str:
        return self.reader.where(i)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        return normalize(self.reader[i], self.kind, self.fields, self.reader.where(i))

    def all(self) -> list[dict[str, Any]]:
        """Every example, validated (the first bad record raises)."""
        return [self[i] for i in range(len(self))]

    def __repr__(self) -> str:
        return f"ExampleSource({type(self.reader).__name__}, kind={self.kind})"


def _required_columns(kind: str, fm: FieldMap) -> dict[str, str]:
    if kind == "text":
        names = ["text"]
    elif kind == "preference":
        names = ["chosen", "rejected"] + ([] if fm.prompt_template else ["prompt"])
    elif "messages" in fm.fields:
        names = ["messages"]
    else:
        names = (
            ([] if fm.prompt_template else ["prompt"])
            + (["label"] if "label" in fm.fields else ["response"])
            + (["choices"] if "choices" in fm.fields else [])
        )
    return {n: fm.column(n) for n in names}
