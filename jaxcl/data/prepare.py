"""Tokenize a task's training data once into ArrayRecord shards, and read it back by index.

``jaxcl prepare RECIPE`` runs :func:`prepare_recipe`: every file-sourced ``text`` or
``instruction`` task is read row by row, encoded as whole documents
(:func:`~jaxcl.data.pipeline.encode_documents`, the layout the packed stream trains on) and
written into a folder **beside the training data**::

    data/qa.jsonl            ->  data/qa.jsonl.jaxcl-prepared/
    data/corpus/  (a folder) ->  data/corpus.jaxcl-prepared/    (a sibling: a folder source
                                                                  must not read its own cache)
    TRACE  ROOT/<Task>/train.json              ->  ROOT/<Task>/train.json.jaxcl-prepared/
    O-LoRA ROOT/<Category>/<task>/train.json   ->  .../<task>/train.json.jaxcl-prepared/

holding ``docs-00000.array_record, docs-00001.array_record, ...`` (about 64 MiB of records each,
``group_size:1`` for random access) and ``manifest.json``. Only the ``train`` split is prepared
(evaluation sets are small and read as before). Not prepared, and said so in the summary:
bundled (generated) data, preference pairs (they are encoded to the stage's ``seq_len``, not as
documents), in-memory sources (already in memory: nothing to save) and TFDS sources (already
random-access ArrayRecord on disk).

Record ``i`` is source row ``i``, so the training stream's row selection (held-out rows,
``train_size``) works unchanged. A record is ``uint32 n`` (little-endian), then ``n`` int32 token
ids, then ``n`` int8 loss-mask values; a bad row kept under ``on_bad_row: skip`` is an empty
record (and :class:`PreparedDocs` returns ``None`` for it). With ``on_bad_row: error`` the first
bad row stops preparation with its file and line, and nothing is left behind: shards and manifest
are written into a temporary folder that is renamed into place only at the end.

The manifest records the format version, a fingerprint of the tokenizer, the source spec (paths
resolved, eval settings left out: they do not change the training rows) and every input file
with its size and ``mtime_ns``. :func:`open_prepared` compares all of these with the recipe and
refuses a stale cache with a message naming the manifest and what changed, so a training run
never reads tokens of data or a tokenizer it was not given. Two tasks over the same training
file share one cache, so they must read it with the same spec (fields, templates, kind).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from jaxcl.data.sources import BadRowError, ExampleSource, _files
from jaxcl.data.spec import DataSpec

FORMAT, VERSION = "jaxcl-prepared", 1
SUFFIX = ".jaxcl-prepared"
MANIFEST = "manifest.json"
LENGTHS = "lengths.npy"  # every record's token count, for epoch budgets of packed stages
SHARD_BYTES = 64 << 20  # a shard is closed once its records hold this many bytes
CHUNK_ROWS = 256  # examples per batched tokenizer call
BAD_ROW_PLACES = 20  # places of bad rows kept in the manifest
WRITER_OPTIONS = "group_size:1,zstd:1"  # group_size 1: one record is read without its neighbours
_HEADER = struct.Struct("<I")
# Per source type: the suffixes its reader lists in a folder (the readers in jaxcl.data.sources).
_SUFFIXES = {
    "jsonl": ((".jsonl", ".json"), "JSON lines"),
    "json": ((".json",), "JSON"),
    "parquet": ((".parquet",), "Parquet"),
}
_PATH_FIELDS = ("train", "root", "builder_dir", "data_dir")
_EVAL_FIELDS = {"eval", "eval_split"}

#: ``progress(done_rows, total_rows)``, called after every chunk
ProgressFn = Callable[[int, int], None]


# ----------------------------------------------------------------------------- fingerprints


def _sha256(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _simple_params(tokenizer: Any) -> dict[str, Any]:
    """The public scalar attributes of a tokenizer and its class (what a simple tokenizer such
    as the byte tokenizer is made of)."""
    names = {n for n in dir(tokenizer) if not n.startswith("_")}
    out = {}
    for name in sorted(names):
        value = getattr(tokenizer, name, None)
        if isinstance(value, bool | int | float | str) or value is None:
            out[name] = value
    return out


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of everything that decides the token ids jaxcl gets from ``tokenizer``.

    A transformers tokenizer: its backend's full JSON (vocabulary, merges, normalizer,
    pre-tokenizer, added tokens), its special token ids and its chat template (instruction chats
    are rendered with it). Without a fast backend, the vocabulary. Any other tokenizer (the byte
    tokenizer): its class and its scalar parameters (offset, vocabulary size, special ids).
    """
    specials = {
        k: getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
    }
    kind = f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body: Any = {"backend": backend.to_str(), "chat_template": tokenizer.chat_template}
    elif hasattr(tokenizer, "get_vocab") and hasattr(tokenizer, "apply_chat_template"):
        body = {"vocab": tokenizer.get_vocab(), "chat_template": tokenizer.chat_template}
    else:
        body = {"params": _simple_params(tokenizer)}
    return _sha256({"class": kind, "specials": specials, **body})


def _spec_dump(data: DataSpec) -> dict[str, Any]:
    """The source spec as it decides the training rows: paths resolved, eval settings out."""
    dump = data.source.model_dump(mode="json", exclude=_EVAL_FIELDS)  # type: ignore[union-attr]
    for key in _PATH_FIELDS:
        if isinstance(dump.get(key), str):
            dump[key] = str(Path(dump[key]).expanduser().resolve())
    return dump


def _olora_folder(root: str, task: str) -> Path:
    from jaxcl.data.layouts import _olora_dir

    return _olora_dir(Path(root).expanduser(), task)


def input_files(data: DataSpec) -> list[Path]:
    """Every file the training split's reader reads (resolved), listed without reading them."""
    src: Any = data.source
    if src is None:
        return []
    if src.type in _SUFFIXES:
        suffixes, what = _SUFFIXES[src.type]
        return [p.resolve() for p in _files(Path(src.train).expanduser(), suffixes, what)]
    if src.type == "trace":
        return [(Path(src.root).expanduser() / src.task / "train.json").resolve()]
    if src.type == "olora":
        folder = _olora_folder(src.root, src.task)
        return [(folder / "train.json").resolve(), (folder / "labels.json").resolve()]
    if src.type in ("superni", "lima"):
        return [_train_location(data)]
    return []  # memory (the records are in the spec) and tfds (not prepared)


def _file_entry(path: Path) -> dict[str, Any]:
    try:
        st = path.stat()
    except FileNotFoundError:
        return {"path": str(path), "size": None, "mtime_ns": None}
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def source_fingerprint(data: DataSpec) -> dict[str, Any]:
    """``{"spec": ..., "files": [{path, size, mtime_ns}, ...]}``: the source spec's dump (type,
    paths, fields, templates, kind) and every input file of the training split."""
    if data.source is None:
        raise ValueError("bundled data has no source to fingerprint")
    return {"spec": _spec_dump(data), "files": [_file_entry(p) for p in input_files(data)]}


# ----------------------------------------------------------------------------- where


def not_prepared_reason(data: DataSpec) -> str | None:
    """Why ``data`` is not prepared (``None``: it is preparable)."""
    if data.bundled is not None:
        return "bundled (generated) data"
    if data.kind == "preference":
        return "preference pairs are encoded per stage (seq_len)"
    src: Any = data.source
    if src.type == "memory":
        return "in-memory data"
    if src.type == "tfds":
        return "a TFDS source (already ArrayRecord on disk)"
    return None


def _train_location(data: DataSpec) -> Path:
    src: Any = data.source
    if src.type in _SUFFIXES:
        return Path(src.train).expanduser().resolve()
    if src.type == "trace":
        return (Path(src.root).expanduser() / src.task / "train.json").resolve()
    if src.type == "superni":
        return (Path(src.root).expanduser() / "SuperNI" / src.task / "train.json").resolve()
    if src.type == "lima":
        return (Path(src.root).expanduser() / "train.jsonl").resolve()
    return (_olora_folder(src.root, src.task) / "train.json").resolve()


def prepared_path(data: DataSpec) -> Path | None:
    """The cache folder of ``data``'s training split, ``<train file or folder>.jaxcl-prepared``
    beside it; ``None`` when such data is not prepared (:func:`not_prepared_reason`)."""
    if not_prepared_reason(data) is not None:
        return None
    location = _train_location(data)
    return location.with_name(location.name + SUFFIX)


# ----------------------------------------------------------------------------- records


def encode_record(ids: np.ndarray, mask: np.ndarray) -> bytes:
    """One document as bytes: ``uint32 n``, ``n`` int32 ids, ``n`` int8 mask values."""
    ids = np.asarray(ids, "<i4")
    mask = np.asarray(mask, np.int8)
    if ids.shape != mask.shape or ids.ndim != 1:
        raise ValueError(f"ids {ids.shape} and mask {mask.shape} must be equal 1-D shapes")
    return _HEADER.pack(len(ids)) + ids.tobytes() + mask.tobytes()


def decode_record(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The ``(ids int32, mask int8)`` of a record; ``None`` for an empty (skipped) record."""
    if not raw:
        return None
    (n,) = _HEADER.unpack_from(raw)
    if len(raw) != _HEADER.size + 5 * n:
        raise ValueError(
            f"{where}: corrupt record ({len(raw)} bytes for {n} tokens, expected "
            f"{_HEADER.size + 5 * n}); run `jaxcl prepare` again"
        )
    ids = np.frombuffer(raw, "<i4", n, _HEADER.size).astype(np.int32)
    mask = np.frombuffer(raw, np.int8, n, _HEADER.size + 4 * n).copy()
    return ids, mask


# ----------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class PrepareSummary:
    """What preparing one task's data did (``note`` says why not, or that it was up to date)."""

    path: Path | None
    docs: int = 0  # documents stored (source rows less bad rows)
    rows: int = 0  # source rows (= records)
    tokens: int = 0
    trained_tokens: int = 0  # loss-mask sum
    bad_rows: int = 0
    seconds: float = 0.0
    task: str = ""
    note: str | None = None

    def line(self) -> str:
        """One line for the command line."""
        head = f"{self.task}: " if self.task else ""
        if self.path is None:
            return f"{head}not prepared ({self.note})"
        note = f" [{self.note}]" if self.note else ""
        return (
            f"{head}{self.docs:,} docs, {self.tokens:,} tokens ({self.trained_tokens:,} trained), "
            f"{self.bad_rows:,} bad rows -> {self.path} ({self.seconds:.1f} s){note}"
        )


def _encode_one(example: dict[str, Any], kind: str, tokenizer: Any, where: str) -> Any:
    from jaxcl.data.pipeline import encode_documents

    try:
        return encode_documents([example], kind, tokenizer)[0]
    except BadRowError as err:
        return BadRowError(where, err.problem)
    except ValueError as err:  # not a problem of the row's data: never skipped
        raise ValueError(f"{where}: {err}") from None


def encode_rows(source: ExampleSource, rows: range, kind: str, tokenizer: Any) -> list[Any]:
    """Each row of ``rows`` as ``(ids, mask)``, or the :class:`BadRowError` it raised (the
    caller decides to skip or stop). Good rows are tokenized in one batched call."""
    from jaxcl.data.pipeline import encode_documents

    out: list[Any] = [None] * len(rows)
    good, places = [], []
    for k, i in enumerate(rows):
        try:
            good.append(source[i])
            places.append(k)
        except BadRowError as err:
            out[k] = err
    try:
        docs = encode_documents(good, kind, tokenizer)
    except ValueError:  # find the culprit, named by its own place
        docs = [
            _encode_one(e, kind, tokenizer, source.where(rows[k])) for e, k in zip(good, places)
        ]
    for k, doc in zip(places, docs):
        out[k] = doc
    return out


class _ShardWriter:
    """Records into ``docs-NNNNN.array_record`` files of about ``shard_bytes`` each."""

    def __init__(self, folder: Path, shard_bytes: int) -> None:
        self.folder, self.shard_bytes = folder, shard_bytes
        self.shards: list[dict[str, Any]] = []
        self._writer: Any = None
        self._bytes = 0

    def write(self, record: bytes) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        if self._writer is None:
            name = f"docs-{len(self.shards):05d}.array_record"
            self._writer = ArrayRecordWriter(str(self.folder / name), WRITER_OPTIONS)
            self.shards.append({"name": name, "records": 0})
            self._bytes = 0
        self._writer.write(record)
        self.shards[-1]["records"] += 1
        self._bytes += len(record)
        if self._bytes >= self.shard_bytes:
            self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _make_temp(target: Path) -> Path:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}.tmp-", dir=target.parent))
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared dataset's cache from other users
        return tmp
    except OSError as err:
        raise ValueError(
            f"{target.parent}: cannot write the prepared data beside the source ({err.strerror})"
        ) from None


def _move_into_place(tmp: Path, target: Path) -> None:
    """Replace ``target`` by ``tmp`` (the old cache, if any, is removed after the rename)."""
    old = None
    if target.exists():
        old = target.with_name(f"{tmp.name}.old")
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _check_listing(source: ExampleSource, fingerprint: dict[str, Any]) -> None:
    files = getattr(source.reader, "files", None)
    if files is None:
        return
    listed = [f["path"] for f in fingerprint["files"]]
    read = [str(Path(f).resolve()) for f in files]
    if read != listed:
        raise ValueError(
            f"the reader reads {read}, but the fingerprint lists {listed} (a bug in "
            "jaxcl.data.prepare.input_files: it must list what the reader reads)"
        )


def prepare_data(
    data: DataSpec,
    tokenizer: Any,
    *,
    progress: ProgressFn | None = None,
    shard_bytes: int = SHARD_BYTES,
) -> PrepareSummary:
    """Tokenize ``data``'s training split into shards at :func:`prepared_path` (replacing what
    is there). A bad row is an empty record (``on_bad_row: skip``) or raises its
    :class:`BadRowError` (``error``), leaving no cache behind."""
    target = prepared_path(data)
    if target is None:
        raise ValueError(f"not prepared: {not_prepared_reason(data)}")
    start = time.perf_counter()
    fingerprint = source_fingerprint(data)  # before reading: a change during the run is seen
    source = data.source.source("train")  # type: ignore[union-attr]
    _check_listing(source, fingerprint)
    skip = data.on_bad_row == "skip"
    total = len(source)
    tmp = _make_temp(target)
    writer = _ShardWriter(tmp, shard_bytes)
    counts = {"rows": total, "docs": 0, "tokens": 0, "trained_tokens": 0, "bad_rows": 0}
    lengths = np.zeros(total, np.int64)  # tokens per source row (0: a bad row)
    places: list[dict[str, Any]] = []
    try:
        for lo in range(0, total, CHUNK_ROWS):
            rows = range(lo, min(lo + CHUNK_ROWS, total))
            for i, doc in zip(rows, encode_rows(source, rows, data.kind, tokenizer)):
                if isinstance(doc, BadRowError):
                    if not skip:
                        raise doc
                    counts["bad_rows"] += 1
                    if len(places) < BAD_ROW_PLACES:
                        places.append({"row": i, "where": doc.where, "problem": doc.problem})
                    writer.write(b"")
                    continue
                ids, mask = doc
                writer.write(encode_record(ids, mask))
                lengths[i] = len(ids)
                counts["docs"] += 1
                counts["tokens"] += len(ids)
                counts["trained_tokens"] += int(np.sum(mask, dtype=np.int64))
            if progress is not None:
                progress(rows.stop, total)
        writer.close()
        np.save(tmp / LENGTHS, lengths, allow_pickle=False)
        seconds = time.perf_counter() - start
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "tokenizer_class": type(tokenizer).__name__,
            "source": fingerprint,
            "kind": data.kind,
            "on_bad_row": data.on_bad_row,
            "counts": counts,
            "bad_row_places": places,
            "shards": writer.shards,
            "lengths": LENGTHS,
            "seconds": round(seconds, 3),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _move_into_place(tmp, target)
    except BaseException:
        writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PrepareSummary(target, **_summary_counts(counts), seconds=seconds)


def _summary_counts(counts: dict[str, int]) -> dict[str, int]:
    keys = ("docs", "rows", "tokens", "trained_tokens", "bad_rows")
    return {k: int(counts[k]) for k in keys}


# ----------------------------------------------------------------------------- reading


class PreparedDocs:
    """Random access to prepared documents: ``len``, ``[i] -> (ids, mask)`` or ``None`` (a
    bad row skipped at preparation), ``where(i)``; thread-safe (Grain's ArrayRecord source
    keeps one locked reader per shard; decoding is pure)."""

    def __init__(self, folder: Path, manifest: dict[str, Any]) -> None:
        import grain

        self.folder, self.manifest = Path(folder), manifest
        self.shards = [self.folder / s["name"] for s in manifest["shards"]]
        for shard in self.shards:
            if not shard.is_file():
                raise ValueError(
                    f"{self.folder / MANIFEST}: shard {shard.name} is missing; "
                    "run `jaxcl prepare` again"
                )
        self._starts = np.cumsum([0] + [int(s["records"]) for s in manifest["shards"]])
        self._source = grain.sources.ArrayRecordDataSource([str(p) for p in self.shards])
        if len(self._source) != self.counts["rows"]:
            raise ValueError(
                f"{self.folder / MANIFEST}: the shards hold {len(self._source)} records, the "
                f"manifest counts {self.counts['rows']} rows; run `jaxcl prepare` again"
            )

    @property
    def counts(self) -> dict[str, int]:
        """The manifest's counts: rows, docs, tokens, trained_tokens, bad_rows."""
        return dict(self.manifest["counts"])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def lengths(self) -> np.ndarray | None:
        """Every record's token count (0 for a skipped bad row); ``None`` for a cache written
        before the counts were kept."""
        name = self.manifest.get("lengths")
        if name is None or not (self.folder / name).is_file():
            return None
        lengths = np.load(self.folder / name, allow_pickle=False)
        if lengths.shape != (len(self),):
            raise ValueError(
                f"{self.folder / name}: {lengths.shape[0]} lengths for {len(self)} records; "
                "run `jaxcl prepare` again"
            )
        return lengths

    def where(self, i: int) -> str:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} is outside the {len(self)} prepared rows")
        f = int(np.searchsorted(self._starts, i, side="right")) - 1
        return f"{self.shards[f]}, record {i - int(self._starts[f])} (source row {i})"

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray] | None:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} is outside the {len(self)} prepared rows")
        raw = self._source[i]
        return decode_record(raw, self.where(i)) if raw else None

    def __repr__(self) -> str:
        return f"PreparedDocs({self.folder}, {len(self)} rows)"


def _spec_change(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    keys = sorted(set(old) | set(new))
    changed = [
        f"{k} ({old.get(k)!r:.80} -> {new.get(k)!r:.80})" for k in keys if old.get(k) != new.get(k)
    ]
    return f"the source spec changed: {'; '.join(changed)}" if changed else None


def _files_change(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> str | None:
    before, now = {f["path"]: f for f in old}, {f["path"]: f for f in new}
    changes = []
    for path in sorted(set(before) | set(now)):
        a, b = before.get(path), now.get(path)
        if a is None:
            changes.append(f"{path} is new")
        elif b is None or b["size"] is None:
            changes.append(f"{path} is gone")
        elif a["size"] != b["size"]:
            changes.append(f"{path} changed (size {a['size']} -> {b['size']} bytes)")
        elif a["mtime_ns"] != b["mtime_ns"]:
            changes.append(f"{path} changed (modified since it was prepared)")
    if not changes:
        return None
    more = f" and {len(changes) - 3} more" if len(changes) > 3 else ""
    return "; ".join(changes[:3]) + more


def staleness(manifest: dict[str, Any], data: DataSpec, tokenizer: Any) -> str | None:
    """What differs between a manifest and the recipe's data and tokenizer (``None``: fresh)."""
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        return (
            f"it is format {manifest.get('format')!r} version {manifest.get('version')!r}; "
            f"this jaxcl reads {FORMAT!r} version {VERSION}"
        )
    new = source_fingerprint(data)
    reason = _spec_change(manifest["source"]["spec"], new["spec"])
    if reason:
        return reason
    if manifest["tokenizer"] != tokenizer_fingerprint(tokenizer):
        return (
            f"the tokenizer changed (prepared with a {manifest.get('tokenizer_class')}, "
            f"fingerprint {manifest['tokenizer'][:12]}; the recipe's {type(tokenizer).__name__} "
            f"has {tokenizer_fingerprint(tokenizer)[:12]})"
        )
    reason = _files_change(manifest["source"]["files"], new["files"])
    if reason:
        return reason
    bad = manifest["counts"]["bad_rows"]
    if data.on_bad_row == "error" and bad:
        first = manifest["bad_row_places"][0]
        return (
            f"it holds {bad} bad rows skipped under on_bad_row: skip (first: {first['where']}: "
            f"{first['problem']}), but the recipe says on_bad_row: error"
        )
    return None


def open_prepared(data: DataSpec, tokenizer: Any) -> PreparedDocs | None:
    """The prepared documents of ``data``'s training split; ``None`` when there is no cache (or
    such data is never prepared). A stale cache raises a ``ValueError`` naming its manifest and
    what changed (the tokenizer, a source file, the spec)."""
    folder = prepared_path(data)
    if folder is None or not (folder / MANIFEST).is_file():
        return None
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{path}: unreadable manifest ({err}); run `jaxcl prepare` again"
        ) from None
    reason = staleness(manifest, data, tokenizer)
    if reason:
        raise ValueError(
            f"{path}: stale prepared data: {reason}; run `jaxcl prepare RECIPE` again "
            f"(or delete {folder})"
        )
    return PreparedDocs(folder, manifest)


# ----------------------------------------------------------------------------- recipes


def model_tokenizer(model: Any) -> Any:
    """The tokenizer ``ModelSpec.build`` returns, without building the model's parameters."""
    if getattr(model, "add_tokens", None) is not None:  # the tokenizer extended by new tokens
        from jaxcl.models.vocab import spec_tokenizer

        return spec_tokenizer(model.model_dump_json())[0]
    if model.source is not None:
        from jaxcl.models.pretrained import load_tokenizer

        return load_tokenizer(model.source)
    from jaxcl.models.tokenizer import ByteTokenizer

    return ByteTokenizer()


def _plan(recipe: Any) -> tuple[list[tuple[str, DataSpec]], dict[Path, tuple[str, DataSpec]]]:
    """Every task ``(label, data)`` and, per cache folder, the first task's label and the data
    to prepare there (``on_bad_row: error`` wins when tasks sharing a file disagree: the
    strictest is what a run would do)."""
    tasks = [(f"{s.name}/{t.name}", t.data) for s in recipe.stages for t in s.tasks]
    jobs: dict[Path, tuple[str, DataSpec]] = {}
    for label, data in tasks:
        folder = prepared_path(data)
        if folder is None:
            continue
        if folder not in jobs:
            jobs[folder] = (label, data)
            continue
        owner, first = jobs[folder]
        if _spec_dump(first) != _spec_dump(data):
            raise ValueError(
                f"tasks {owner} and {label} read {folder.name.removesuffix(SUFFIX)} with "
                "different source specs; one prepared cache serves one spec"
            )
        if data.on_bad_row == "error":
            jobs[folder] = (owner, data)
    return tasks, jobs


def _bar_updater(bars: Any, bar: Any) -> ProgressFn:
    return lambda done, total: bars.update(bar, completed=done, total=total)


def _fresh(data: DataSpec, tokenizer: Any) -> PreparedDocs | None:
    try:
        return open_prepared(data, tokenizer)
    except ValueError:
        return None


def prepare_recipe(recipe: Any, console: Any, *, force: bool = False) -> list[PrepareSummary]:
    """Prepare every file-sourced text/instruction task of ``recipe`` (each cache once), with a
    progress bar per cache; a cache already fresh is kept unless ``force``. One summary per
    task, in recipe order."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    tokenizer = model_tokenizer(recipe.model)
    tasks, jobs = _plan(recipe)
    done: dict[Path, PrepareSummary] = {}
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as bars:
        for folder, (label, data) in jobs.items():
            kept = None if force else _fresh(data, tokenizer)
            if kept is not None:
                done[folder] = PrepareSummary(
                    folder, **_summary_counts(kept.counts), note="up to date"
                )
                continue
            bar = bars.add_task(label, total=None)
            try:
                done[folder] = prepare_data(
                    data,
                    tokenizer,
                    progress=_bar_updater(bars, bar),
                )
            except ValueError as err:
                raise ValueError(f"task {label}: {err}") from None
    out = []
    for label, data in tasks:
        folder = prepared_path(data)
        if folder is None:
            out.append(PrepareSummary(None, task=label, note=not_prepared_reason(data)))
        else:
            out.append(replace(done[folder], task=label))
    return out
