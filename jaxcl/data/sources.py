"""Grain data sources over real files: JSON lines, JSON arrays, Parquet, TFDS and in-memory lists.

Every source is random access (``len`` and ``[i]``) so that it feeds ``grain.MapDataset.source``.
A *reader* yields raw records and knows where each one came from (``file, line 12``,
``file, row 7``); :class:`ExampleSource` maps raw records to canonical examples of one kind
through a :class:`FieldMap`, and every error it raises names the place and the field (a
problem with one record is a :class:`BadRowError`, one with the whole source a ValueError)::

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
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jaxcl.data.tokenize import check_messages

CANONICAL = {
    "text": ("text",),
    "instruction": ("prompt", "response", "messages", "label", "choices"),
    "preference": ("prompt", "chosen", "rejected"),
}


class BadRowError(ValueError):
    """A problem with one record (malformed JSON, a missing or mistyped field, a bad chat, ...).

    The source as a whole is fine, so a caller may skip the row (``on_bad_row: skip``); errors
    about the whole source (missing file, empty dataset, wrong Parquet schema) stay plain
    :class:`ValueError`. The message is ``"{where}: {problem}"``; ``where`` names the row
    (``data.jsonl, line 812``, ``train.parquet, row 7``).
    """

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where, self.problem = where, problem

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        # Grain worker processes pickle exceptions; the default rebuilds from ``args`` (1 item).
        return type(self), (self.where, self.problem)


def _files(path: str | Path, suffixes: tuple[str, ...], what: str) -> list[Path]:
    path = Path(path)
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.name.endswith(suffixes)
            # a prepared cache (jaxcl prepare) of a file inside the folder is not data
            and not any(part.endswith(".jaxcl-prepared") for part in p.relative_to(path).parts)
        )
        if not files:
            raise ValueError(f"{path}: the folder holds no {what} files ({', '.join(suffixes)})")
        return files
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder")
    return [path]


# Bytes read per step while indexing JSON lines: bounds the memory the index build touches
# (a few times this), whatever the file size. Tests pass a tiny chunk to cross boundaries.
JSONL_CHUNK_BYTES = 16 << 20

_BOM = b"\xef\xbb\xbf"


def _filled(
    chunk: np.ndarray, scratch: np.ndarray, mask: np.ndarray, out: np.ndarray
) -> np.ndarray:
    """Where ``chunk`` holds a byte that ``bytes.strip()`` keeps (not space, ``\\t``-``\\r``).

    In place over preallocated buffers: a lookup table would make numpy build intp indices,
    8 bytes per byte of the chunk.
    """
    n = len(chunk)
    np.subtract(chunk, 9, out=scratch[:n])  # uint8 wraps: bytes 9..13 become 0..4
    np.greater(scratch[:n], 4, out=out[:n])
    np.not_equal(chunk, 32, out=mask[:n])
    return np.logical_and(out[:n], mask[:n], out=out[:n])


def index_lines(file: str | Path, chunk_bytes: int = JSONL_CHUNK_BYTES) -> np.ndarray:
    """``(start, end, line)`` of every non-blank line of ``file``, an ``int64`` array ``[n, 3]``.

    ``end`` is the offset of the line's ``\\n`` (or the file size for a last line without one),
    ``line`` counts from 1 over every line, blank ones included. The file is read in chunks of
    ``chunk_bytes`` with unbuffered ``readinto`` and scanned with numpy, so the memory touched
    is four chunk-sized buffers plus about 64 bytes per line while building (24 kept) and no
    file pages (an mmap scan would pull every page of the file into the RSS).
    """
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    buf, scratch = np.empty(chunk_bytes, np.uint8), np.empty(chunk_bytes, np.uint8)
    mask, filled_mask = np.empty(chunk_bytes, bool), np.empty(chunk_bytes, bool)
    newlines: list[np.ndarray] = []  # file offsets of every "\n"
    content: list[np.ndarray] = []  # per "\n": does its line hold a non-blank byte
    pending = False  # the line running into the next chunk has a non-blank byte
    offset = 0
    with open(file, "rb", buffering=0) as fh:
        while True:
            n = fh.readinto(memoryview(buf))
            if not n:
                break
            chunk = buf[:n]
            nl = np.flatnonzero(np.equal(chunk, 10, out=mask[:n]))
            # Segment k covers chunk[bounds[k]:bounds[k+1]]: the rest of line k up to and
            # including its "\n" (never empty), then the unterminated tail (dropped if empty).
            bounds = np.concatenate(([0], nl + 1))
            if bounds[-1] == n:
                bounds = bounds[:-1]
            filled = np.logical_or.reduceat(_filled(chunk, scratch, mask, filled_mask), bounds)
            if len(nl):
                filled[0] |= pending
                content.append(filled[: len(nl)].copy())
                newlines.append(nl + offset)
                pending = bool(filled[len(nl)]) if len(filled) > len(nl) else False
            else:
                pending = pending or bool(filled[0])
            offset += n
    ends = np.concatenate(newlines) if newlines else np.zeros(0, np.int64)
    keep = np.concatenate(content) if content else np.zeros(0, bool)
    last = int(ends[-1]) + 1 if len(ends) else 0
    if offset > last:  # a last line without "\n"
        ends, keep = np.append(ends, offset), np.append(keep, pending)
    kept = np.flatnonzero(keep)  # 0-based line numbers of the non-blank lines
    out = np.empty((len(kept), 3), np.int64)
    out[:, 1] = ends[kept]
    out[:, 0] = ends[kept - 1] + 1  # the previous line's "\n" + 1 ...
    if len(kept) and kept[0] == 0:
        out[0, 0] = 0  # ... except on the first line
    out[:, 2] = kept + 1
    return out


def _close_fds(fds: dict[int, int]) -> None:
    """Close and forget every descriptor of ``fds`` (also run by the reader's finalizer)."""
    while fds:
        os.close(fds.popitem()[1])


class JsonlReader:
    """JSON lines from a file or every ``*.jsonl`` / ``*.json`` file under a folder (sorted).

    Line offsets are indexed up front with chunked reads (blank lines skipped, see
    :func:`index_lines`); a record is read with ``os.pread`` and parsed when asked for, so a
    multi-GB corpus costs 32 bytes of index per line and no resident file pages. Reads are
    thread-safe (Grain reads from several threads; ``pread`` has no shared file position) and
    the reader pickles (file descriptors are reopened on demand). Don't :meth:`close` while
    other threads read.
    """

    def __init__(self, path: str | Path, *, chunk_bytes: int = JSONL_CHUNK_BYTES) -> None:
        self.files = _files(path, (".jsonl", ".json"), "JSON lines")
        parts = [index_lines(file, chunk_bytes) for file in self.files]
        # Columns: file, start, end, line (filled in place: no second copy of every part).
        self._index = np.empty((sum(map(len, parts)), 4), np.int64)
        row = 0
        for f, part in enumerate(parts):
            self._index[row : row + len(part), 0] = f
            self._index[row : row + len(part), 1:] = part
            row += len(part)
        self._open_files()

    def _open_files(self) -> None:
        """Per-process state: descriptors opened on first read, closed with the reader."""
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()
        weakref.finalize(self, _close_fds, self._fds)

    def __len__(self) -> int:
        return len(self._index)

    def where(self, i: int) -> str:
        f, _, _, line = self._index[i]
        return f"{self.files[f]}, line {line}"

    def _fd(self, f: int) -> int:
        fd = self._fds.get(f)
        if fd is None:
            with self._lock:
                fd = self._fds.get(f)
                if fd is None:
                    fd = self._fds[f] = os.open(self.files[f], os.O_RDONLY)
        return fd

    def raw(self, i: int) -> bytes:
        """The bytes of record ``i`` (its line without the newline)."""
        f, start, end, _ = (int(x) for x in self._index[i])
        raw = os.pread(self._fd(f), end - start, start)
        return raw[len(_BOM) :] if start == 0 and raw.startswith(_BOM) else raw

    def __getitem__(self, i: int) -> Any:
        raw = self.raw(i)
        try:
            return json.loads(raw.decode("utf-8"))
        except json.JSONDecodeError as e:
            raise BadRowError(
                self.where(i), f"malformed JSON ({e.msg} at column {e.colno})"
            ) from None
        except UnicodeDecodeError as e:
            raise BadRowError(self.where(i), f"not UTF-8 text ({e.reason})") from None

    def close(self) -> None:
        """Close the file descriptors (reads after this reopen them)."""
        with self._lock:
            _close_fds(self._fds)

    def __getstate__(self) -> dict[str, Any]:
        return {"files": self.files, "_index": self._index}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open_files()


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

# Decoded row groups kept in memory by a ParquetReader (shared by its threads, most recent
# first): sequential reads, or a few threads reading neighbouring rows, decode each group once.
PARQUET_CACHED_GROUPS = 4


class ParquetReader:
    """Rows of a Parquet file, or of every ``*.parquet`` under a folder (sorted).

    Lazy: only the footers are read up front (row counts per row group, the schema); a row is
    read by decoding its row group, which stays cached (:data:`PARQUET_CACHED_GROUPS`), so a
    pass over the rows in order decodes each row group once. ``columns`` limits the decoded
    columns (default all: a record is a dict of every column, which ``prompt_template`` may
    use). Thread-safe and picklable.
    """

    def __init__(self, path: str | Path, *, columns: Sequence[str] | None = None) -> None:
        import pyarrow.parquet as pq

        self.files = _files(path, (".parquet",), "Parquet")
        self._metadata, self._schemas = [], []
        for file in self.files:
            try:
                with pq.ParquetFile(file) as pf:
                    self._metadata.append(pf.metadata)
                    self._schemas.append(pf.schema_arrow)
            except Exception as e:  # pyarrow raises several types for a bad file
                raise ValueError(f"{file}: not a readable Parquet file ({e})") from None
        self.columns = None if columns is None else list(columns)
        if self.columns is not None:
            for file, schema in zip(self.files, self._schemas):
                missing = [c for c in self.columns if c not in schema.names]
                if missing:
                    raise ValueError(
                        f"{file}: column {missing[0]!r} is missing; "
                        f"columns: {', '.join(schema.names)}"
                    )
        counts = [
            (f, g, meta.row_group(g).num_rows)
            for f, meta in enumerate(self._metadata)
            for g in range(meta.num_row_groups)
        ]
        table = np.asarray([(f, g) for f, g, _ in counts], np.int64).reshape(-1, 2)
        self._group_file, self._group_index = table[:, 0], table[:, 1]
        self._group_starts = np.cumsum([0] + [n for _, _, n in counts], dtype=np.int64)
        self._starts = np.cumsum([0] + [m.num_rows for m in self._metadata], dtype=np.int64)
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._handles: dict[int, Any] = {}
        self._file_locks = [threading.Lock() for _ in self.files]
        self._cache: OrderedDict[int, Any] = OrderedDict()  # group number -> pyarrow Table
        self._cache_lock = threading.Lock()
        self.group_reads = 0  # row groups decoded so far (how well the cache works)

    def check_columns(self, columns: Mapping[str, str]) -> None:
        """Every mapped column exists in every file, with a string (or chat list) type."""
        for file, schema in zip(self.files, self._schemas):
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

    def _handle(self, f: int) -> Any:
        """File ``f`` opened with its footer already parsed (call under its lock)."""
        import pyarrow.parquet as pq

        if f not in self._handles:
            self._handles[f] = pq.ParquetFile(self.files[f], metadata=self._metadata[f])
        return self._handles[f]

    def _group(self, k: int) -> Any:
        """Row group number ``k`` (over all files) as a pyarrow Table, from the cache or read."""
        with self._cache_lock:
            if k in self._cache:
                self._cache.move_to_end(k)
                return self._cache[k]
        f, g = int(self._group_file[k]), int(self._group_index[k])
        with self._file_locks[f]:  # one reader per file at a time; others wait, then hit
            with self._cache_lock:
                if k in self._cache:
                    return self._cache[k]
            table = self._handle(f).read_row_group(g, columns=self.columns)
            with self._cache_lock:
                self.group_reads += 1
                self._cache[k] = table
                while len(self._cache) > PARQUET_CACHED_GROUPS:
                    self._cache.popitem(last=False)
        return table

    def __getitem__(self, i: int) -> Any:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} is outside the {len(self)} rows of the Parquet source")
        k = int(np.searchsorted(self._group_starts, i, side="right")) - 1
        return self._group(k).slice(i - int(self._group_starts[k]), 1).to_pylist()[0]

    def close(self) -> None:
        """Close the open files and drop the cache (reads after this reopen them)."""
        for f, lock in enumerate(self._file_locks):
            with lock:
                handle = self._handles.pop(f, None)
                if handle is not None:
                    handle.close()
        with self._cache_lock:
            self._cache.clear()

    def __getstate__(self) -> dict[str, Any]:
        keep = ("files", "_metadata", "_schemas", "columns", "_group_file", "_group_index")
        return {k: self.__dict__[k] for k in (*keep, "_group_starts", "_starts")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()


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
            raise BadRowError(
                where, f"field {path!r} (the {canonical}) is missing; the record has {have}"
            )
        value = value[part]
    if value is None:
        raise BadRowError(where, f"field {path!r} (the {canonical}) is null")
    return value


#: fields a row trains on, refused when empty or blank (a prompt or a document may be empty)
_NON_EMPTY = frozenset({"response", "chosen", "rejected"})


def _string(record: dict[str, Any], fm: FieldMap, canonical: str, where: str) -> str:
    path = fm.column(canonical)
    value = _get(record, path, canonical, where)
    if not isinstance(value, str):
        raise BadRowError(
            where,
            f"field {path!r} (the {canonical}) must be a string, "
            f"got {type(value).__name__} {value!r:.60}",
        )
    if canonical in _NON_EMPTY and not value.strip():
        raise BadRowError(
            where, f"field {path!r} (the {canonical}) is empty: there is nothing to train on"
        )
    return value


def _prompt(record: dict[str, Any], fm: FieldMap, where: str) -> str:
    if fm.prompt_template is None:
        return _string(record, fm, "prompt", where)
    try:
        return fm.prompt_template.format_map(record)
    except KeyError as e:
        raise BadRowError(
            where,
            f"field {e.args[0]!r} (used by prompt_template) is missing; "
            f"the record has {sorted(record)}",
        ) from None
    except (AttributeError, IndexError, TypeError, ValueError) as e:
        # e.g. "{q[text]}" over a record whose q is a string, or a format spec the value rejects
        raise BadRowError(
            where, f"prompt_template cannot be filled from the record ({type(e).__name__}: {e})"
        ) from None


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    """A validated chat; tokenize's ``check_messages`` raises ValueError, a row error here."""
    try:
        return check_messages(value, where)
    except BadRowError:
        raise
    except ValueError as e:
        message = str(e)
        problem = message.removeprefix(f"{where}: ") if message.startswith(where) else message
        raise BadRowError(where, problem) from None


def _choices(record: dict[str, Any], fm: FieldMap, where: str) -> list[str] | None:
    """A multiple-choice example's options (``None`` when the record has none)."""
    if "choices" not in fm.fields and "choices" not in record:
        return None
    path = fm.column("choices")
    value = _get(record, path, "choices", where)
    if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
        raise BadRowError(
            where,
            f"field {path!r} (the choices) must be a non-empty list of strings, got {value!r:.60}",
        )
    return list(value)


def _label(
    record: dict[str, Any], fm: FieldMap, where: str, choices: list[str] | None = None
) -> str:
    path = fm.column("label")
    value = _get(record, path, "label", where)
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise BadRowError(
            where, f"field {path!r} (the label) must be an integer or a string, got {value!r}"
        )
    if isinstance(value, int) and choices is not None:
        if not 0 <= value < len(choices):
            raise BadRowError(
                where, f"field {path!r} (the label) is {value}, outside the {len(choices)} choices"
            )
        return choices[value]
    if isinstance(value, int) and fm.label_names is not None:
        if not 0 <= value < len(fm.label_names):
            raise BadRowError(
                where,
                f"field {path!r} (the label) is {value}, outside the "
                f"{len(fm.label_names)} label_names",
            )
        return str(fm.label_names[value])
    return str(value)


def normalize(record: Any, kind: str, fm: FieldMap, where: str) -> dict[str, Any]:
    """The canonical example of ``kind`` held by a raw ``record``.

    A problem with the record raises :class:`BadRowError` naming ``where`` and the field; an
    unknown ``kind`` (a recipe mistake, not a row's) raises plain ValueError.
    """
    if kind not in CANONICAL:
        raise ValueError(
            f"unknown example kind {kind!r}; valid kinds: text, instruction, preference"
        )
    if not isinstance(record, dict):
        raise BadRowError(where, f"a record must be an object, got {type(record).__name__}")
    if kind == "text":
        return {"text": _string(record, fm, "text", where)}
    if kind == "instruction":
        chat = "messages" in fm.fields or (
            "prompt" not in fm.fields and fm.prompt_template is None and "messages" in record
        )
        if chat:
            messages = _get(record, fm.column("messages"), "messages", where)
            return {"messages": _messages(messages, where)}
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
            raise BadRowError(
                where, f"the response {response!r:.60} is not one of the choices {choices!r:.120}"
            )
        return {"prompt": prompt, "response": response, "choices": choices}
    row = {
        "prompt": _prompt(record, fm, where),
        "chosen": _string(record, fm, "chosen", where),
        "rejected": _string(record, fm, "rejected", where),
    }
    if row["chosen"].strip() == row["rejected"].strip():
        raise BadRowError(
            where,
            f"chosen and rejected are identical ({row['chosen'].strip()[:60]!r}); "
            "a preference pair needs two different responses",
        )
    return row


class ExampleSource:
    """Canonical examples of one kind over a reader; feed it to ``grain.MapDataset.source``
    (it meets Grain's ``RandomAccessDataSource`` protocol: ``len``, ``[i]`` and ``repr``)."""

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
        """Example ``i``; a bad record (bad chats included) raises :class:`BadRowError`."""
        i = int(i)
        return normalize(self.reader[i], self.kind, self.fields, self.reader.where(i))

    def all(self) -> list[dict[str, Any]]:
        """Every example, validated (the first bad record raises)."""
        return [self[i] for i in range(len(self))]

    def sample(self, n: int, *, skip_bad: bool = False) -> list[dict[str, Any]]:
        """The first ``min(n, len)`` examples, validated: checks a recipe's field mapping
        against real rows before training, without reading the whole corpus. A bad row raises
        its :class:`BadRowError`, or with ``skip_bad`` is left out."""
        if n < 0:
            raise ValueError(f"sample: n must be >= 0, got {n}")
        rows = []
        for i in range(min(int(n), len(self))):
            try:
                rows.append(self[i])
            except BadRowError:
                if not skip_bad:
                    raise
        return rows

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
