"""Recipe entry for a task's data, and loading it as a list of examples.

A task's data is either a bundled generated dataset (``bundled: cit/capitals``) or a ``source``
naming real files, discriminated by ``type``::

    data: {bundled: cit/capitals, train_size: 512}
    data:
      source: {type: jsonl, kind: instruction, train: data/qa/, eval: data/qa_eval.jsonl,
               fields: {prompt: question, response: answer}}
    data: {source: {type: parquet, kind: text, train: corpus.parquet, fields: {text: body}}}
    data: {source: {type: tfds, kind: instruction, name: my_set, data_dir: ~/tfds,
                    prompt_template: "Review: {text}\\nSentiment:", fields: {label: label},
                    label_names: [negative, positive]}}
    data: {source: {type: trace, root: LLM-CL-Benchmark_500, task: FOMC}}
    data: {source: {type: olora, root: CL_Benchmark, task: dbpedia}}
    data: {source: {type: superni, root: CL_Benchmark, task: task1572_samsum_summary}}
    data: {source: {type: lima, root: lima}}            # the GAIR/lima release: train.jsonl
    data: {source: {type: memory, kind: text, train: [{text: ...}, ...]}}

Without an ``eval`` location, ``eval_size`` examples are held out of the training data (a seeded
draw). ``train_size`` / ``eval_size`` cap a source's splits only when given.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
import pydantic
from pydantic import Field

if TYPE_CHECKING:  # Grain loads when a dataset is asked for
    import grain

from jaxcl.data.benchmarks import BUNDLED, generate, kind_of
from jaxcl.data.layouts import read_lima, read_olora, read_superni, read_trace
from jaxcl.data.sources import (
    CANONICAL,
    ExampleSource,
    FieldMap,
    JsonArrayReader,
    JsonlReader,
    MemoryReader,
    ParquetReader,
    TfdsReader,
)
from jaxcl.spec import Strict

Kind = Literal["text", "instruction", "preference"]


class _Mapped(Strict):
    """Shared by the generic sources: the example kind and how to find its fields."""

    kind: Kind
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="canonical field (text, prompt, response, messages, label, chosen, "
        "rejected) -> source field name (a.b for nested)",
    )
    prompt_template: str | None = None
    label_names: list[str] | None = None

    @pydantic.model_validator(mode="after")
    def _mappable(self) -> _Mapped:
        unknown = set(self.fields) - set(CANONICAL[self.kind])
        if unknown:
            raise ValueError(
                f"fields: {', '.join(sorted(unknown))} cannot be mapped for {self.kind} data; "
                f"valid names: {', '.join(CANONICAL[self.kind])}"
            )
        return self

    def field_map(self) -> FieldMap:
        return FieldMap(self.fields, self.prompt_template, self.label_names)

    def _path(self, split: str) -> str | None:
        """The split's file or folder (None: a source without one, e.g. TFDS or in-memory)."""
        return None

    def reader(self, split: str) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    def has_split(self, split: str) -> bool:
        return split == "train" or getattr(self, "eval", None) is not None

    _sources: dict[tuple, ExampleSource] = pydantic.PrivateAttr(default_factory=dict)

    def source(self, split: str) -> ExampleSource:
        """The split's examples (opened once: a file's line index is built once per run)."""
        key = (split, _stamp(self._path(split)))
        if key not in self._sources:  # a rewritten file is opened afresh
            self._sources[key] = ExampleSource(self.reader(split), self.kind, self.field_map())
        return self._sources[key]

    def examples(self, split: str) -> list[dict[str, Any]]:
        return self.source(split).all()


def _stamp(path: str | None) -> tuple[int, int] | None:
    """A file's (size, mtime) or a folder's, to notice a source rewritten since it was opened."""
    if path is None or not Path(path).exists():
        return None
    stat = Path(path).expanduser().stat()
    return stat.st_size, stat.st_mtime_ns


def _must_exist(path: str | None) -> str | None:
    if path is not None and not Path(path).expanduser().exists():
        raise ValueError(f"path {path!r} does not exist")
    return path


#: a file or folder that must exist when the recipe is validated (so a typo fails before training)
ExistingPath = Annotated[str, pydantic.AfterValidator(_must_exist)]


class _Files(_Mapped):
    train: ExistingPath
    eval: ExistingPath | None = None

    def _path(self, split: str) -> str:
        return self.train if split == "train" else self.eval  # type: ignore[return-value]


class JsonlSourceSpec(_Files):
    """JSON lines: a file, or a folder of ``*.jsonl`` / ``*.json`` JSON-lines files."""

    type: Literal["jsonl"]

    def reader(self, split: str) -> JsonlReader:
        return JsonlReader(self._path(split))


class JsonSourceSpec(_Files):
    """JSON files that each hold an array of records (a file or a folder)."""

    type: Literal["json"]

    def reader(self, split: str) -> JsonArrayReader:
        return JsonArrayReader(self._path(split))


class ParquetSourceSpec(_Files):
    """Parquet: a file or a folder of ``*.parquet`` files."""

    type: Literal["parquet"]

    def reader(self, split: str) -> ParquetReader:
        return ParquetReader(self._path(split))


class TfdsSourceSpec(_Mapped):
    """A prepared TFDS dataset, read through ``as_data_source`` (array_record)."""

    type: Literal["tfds"]
    name: str | None = None
    data_dir: str | None = None
    builder_dir: ExistingPath | None = None
    train_split: str = "train"
    eval_split: str | None = None

    @pydantic.model_validator(mode="after")
    def _one(self) -> TfdsSourceSpec:
        if (self.name is None) == (self.builder_dir is None):
            raise ValueError("a tfds source needs exactly one of name or builder_dir")
        return self

    def has_split(self, split: str) -> bool:
        return split == "train" or self.eval_split is not None

    def reader(self, split: str) -> TfdsReader:
        return TfdsReader(
            split=self.train_split if split == "train" else self.eval_split,  # type: ignore[arg-type]
            name=self.name,
            data_dir=self.data_dir,
            builder_dir=self.builder_dir,
        )


class MemorySourceSpec(_Mapped):
    """Records given inline (in the recipe or from Python)."""

    type: Literal["memory"]
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]] | None = None

    def reader(self, split: str) -> MemoryReader:
        records = self.train if split == "train" else self.eval
        return MemoryReader(records or [], f"in-memory {split} data")


class TraceSourceSpec(Strict):
    """One task of the TRACE benchmark layout (``ROOT/<Task>/{train,eval,test}.json``)."""

    type: Literal["trace"]
    root: ExistingPath
    task: str
    eval_split: Literal["eval", "test"] = "eval"
    kind: Literal["instruction"] = "instruction"

    def has_split(self, split: str) -> bool:
        return True

    def examples(self, split: str) -> list[dict[str, Any]]:
        return read_trace(self.root, self.task, "train" if split == "train" else self.eval_split)

    def source(self, split: str) -> ExampleSource:
        return ExampleSource(MemoryReader(self.examples(split)), "instruction")


class OLoraSourceSpec(Strict):
    """One task of the standard CL benchmark in O-LoRA's ``CL_Benchmark`` layout."""

    type: Literal["olora"]
    root: ExistingPath
    task: str
    eval_split: Literal["dev", "test"] = "test"
    instruction: str | None = None
    task_prefix: bool = Field(
        True,
        description="start each prompt with 'Task:<Category>\\nDataset:<task>\\n', as O-LoRA's "
        "scripts do (--add_task_name True --add_dataset_name True)",
    )
    kind: Literal["instruction"] = "instruction"

    def has_split(self, split: str) -> bool:
        return True

    def examples(self, split: str) -> list[dict[str, Any]]:
        s = "train" if split == "train" else self.eval_split
        return read_olora(self.root, self.task, s, self.instruction, task_prefix=self.task_prefix)

    def source(self, split: str) -> ExampleSource:
        return ExampleSource(MemoryReader(self.examples(split)), "instruction")


class SuperNISourceSpec(Strict):
    """One task of SuperNI's 15-task continual-learning split (``ROOT/SuperNI/<task>/``, SAPT's
    layout of Natural Instructions task files)."""

    type: Literal["superni"]
    root: ExistingPath
    task: str
    eval_split: Literal["dev", "test"] = "test"
    kind: Literal["instruction"] = "instruction"

    def has_split(self, split: str) -> bool:
        return True

    def examples(self, split: str) -> list[dict[str, Any]]:
        return read_superni(self.root, self.task, "train" if split == "train" else self.eval_split)

    def source(self, split: str) -> ExampleSource:
        return ExampleSource(MemoryReader(self.examples(split)), "instruction")


class LimaSourceSpec(Strict):
    """The LIMA release (``ROOT/train.jsonl`` of ``conversations``). It has no scored split
    (its test prompts have no responses): as a task's data, ``eval_size`` examples are held out."""

    type: Literal["lima"]
    root: ExistingPath
    kind: Literal["instruction"] = "instruction"

    def has_split(self, split: str) -> bool:
        return split == "train"

    def examples(self, split: str) -> list[dict[str, Any]]:
        return read_lima(self.root, split)

    def source(self, split: str) -> ExampleSource:
        return ExampleSource(MemoryReader(self.examples(split), "LIMA train.jsonl"), "instruction")


SourceSpec = Annotated[
    JsonlSourceSpec
    | JsonSourceSpec
    | ParquetSourceSpec
    | TfdsSourceSpec
    | MemorySourceSpec
    | TraceSourceSpec
    | OLoraSourceSpec
    | SuperNISourceSpec
    | LimaSourceSpec,
    Field(discriminator="type"),
]


class DataSpec(Strict):
    """A bundled, generated dataset (``cpt/recipes``, ``cit/capitals``...) or a real ``source``."""

    bundled: str | None = None
    source: SourceSpec | None = None
    train_size: int = Field(512, ge=1)
    eval_size: int = Field(64, ge=1)
    seed: int = 0
    on_bad_row: Literal["error", "skip"] = Field(
        "error",
        description="a malformed or incomplete record stops the run naming file and line "
        "(error), or is skipped and counted in results.json and the report (skip)",
    )

    @pydantic.field_validator("bundled")
    @classmethod
    def _known(cls, value: str | None) -> str | None:
        if value is not None and value not in BUNDLED:
            raise ValueError(
                f"unknown bundled dataset {value!r}; valid choices: {', '.join(BUNDLED)}"
            )
        return value

    @pydantic.model_validator(mode="after")
    def _exactly_one(self) -> DataSpec:
        if (self.bundled is None) == (self.source is None):
            raise ValueError("data needs exactly one of bundled (a generated dataset) or source")
        return self

    @pydantic.model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        # Leave out the unused alternative, so a bundled recipe dumps (and fingerprints) exactly
        # as it did before sources existed.
        data = handler(self)
        for key in ("bundled", "source"):
            if getattr(self, key) is None:
                data.pop(key, None)
        if self.on_bad_row == "error":
            data.pop("on_bad_row", None)
        return data

    @property
    def kind(self) -> str:
        """``text``, ``instruction`` or ``preference``."""
        if self.bundled is not None:
            return kind_of(self.bundled)
        return self.source.kind  # type: ignore[union-attr]

    def load(self, split: str) -> list[dict[str, Any]]:
        """The examples of ``split`` (``train`` or ``eval``)."""
        if split not in ("train", "eval"):
            raise ValueError(f"unknown split {split!r}; valid splits: train, eval")
        if self.bundled is not None:
            size = self.train_size if split == "train" else self.eval_size
            return generate(self.bundled, split, size, seed=self.seed)
        src = self.source
        assert src is not None
        if src.has_split("eval"):
            examples = src.examples(split)
        else:
            examples = self._held_out(split)
        cap = {"train": "train_size", "eval": "eval_size"}[split]
        if cap in self.model_fields_set:
            examples = examples[: getattr(self, cap)]
        return examples

    def _held_out(self, split: str) -> list[dict[str, Any]]:
        source = self.source.source("train")  # type: ignore[union-attr]
        if split == "eval":  # the held-out rows alone: a corpus of any size is not read
            return [source[int(i)] for i in self._holdout(len(source))]
        every = source.all()  # loading the whole split in memory validates every row
        rows = self.train_rows()
        return [every[int(rows[i])] for i in range(len(rows))]

    def _holdout(self, n: int) -> np.ndarray:
        """The source rows held out for eval (sorted), a seeded draw of ``eval_size``."""
        if n <= self.eval_size:
            raise ValueError(
                f"data: the source has {n} training examples and no eval location; "
                f"holding out eval_size={self.eval_size} would leave none to train on "
                "(give source.eval or a smaller eval_size)"
            )
        drawn = random.Random(f"holdout/{self.seed}").sample(range(n), self.eval_size)
        return np.sort(np.asarray(drawn, np.int64))

    def train_rows(self) -> TrainRows:
        """The source rows the task trains on, lazily: every row, less the held-out ones when
        the source has no eval location, capped at ``train_size`` when given."""
        src = self.source
        assert src is not None
        n = len(src.source("train"))
        held = np.zeros(0, np.int64) if src.has_split("eval") else self._holdout(n)
        cap = self.train_size if "train_size" in self.model_fields_set else None
        return TrainRows(n, held, cap)

    def documents(self, tokenizer: Any, seq_len: int) -> Any:
        """The training split as a :class:`~jaxcl.data.stream.DocumentSource`: read and
        tokenized row by row (never loaded whole), or from ``jaxcl prepare``'s shards."""
        from jaxcl.data.stream import PreparedDocuments, TokenizedDocuments

        skip = self.on_bad_row == "skip"
        if self.bundled is not None:
            examples = self.load("train")
            return TokenizedDocuments(examples, self.kind, tokenizer, seq_len=seq_len)
        rows = self.train_rows()
        if self.kind != "preference" and tokenizer is not None:
            from jaxcl.data.prepare import open_prepared

            prepared = open_prepared(self, tokenizer)
            if prepared is not None:
                return PreparedDocuments(prepared, self.kind, rows=rows)
        examples = self.source.source("train")  # type: ignore[union-attr]
        return TokenizedDocuments(
            examples, self.kind, tokenizer, seq_len=seq_len, rows=rows, skip=skip
        )

    def sample(self, n: int = 16, *, skip_bad: bool = False) -> list[dict[str, Any]]:
        """The first ``n`` training examples, validated: what a recipe check reads of a source
        (its schema and a sample, never the whole corpus). A bad row raises its
        :class:`BadRowError`, or with ``skip_bad`` is left out."""
        if self.bundled is not None:
            return self.load("train")[:n]
        return self.source.source("train").sample(n, skip_bad=skip_bad)  # type: ignore[union-attr]

    def dataset(self, split: str) -> grain.MapDataset:
        """The examples of ``split`` as a Grain ``MapDataset`` (lazy for file sources)."""
        import grain

        if self.bundled is None and self.source.has_split("eval"):  # type: ignore[union-attr]
            ds = grain.MapDataset.source(self.source.source(split))  # type: ignore[union-attr]
            cap = "train_size" if split == "train" else "eval_size"
            return ds[: getattr(self, cap)] if cap in self.model_fields_set else ds
        return grain.MapDataset.source(self.load(split))


class TrainRows:
    """Row ``i`` of a source's training split: the ``i``-th row not held out (``O(log k)`` by a
    search over the ``k`` held-out rows, so a corpus of any size costs ``k`` integers)."""

    def __init__(self, n: int, held: np.ndarray, cap: int | None = None) -> None:
        self.n, self.held = int(n), np.asarray(held, np.int64)
        self._shifted = self.held - np.arange(len(self.held))
        self.size = self.n - len(self.held) if cap is None else min(cap, self.n - len(held))

    def __len__(self) -> int:
        return self.size

    def indices(self) -> np.ndarray:
        """Every training row's source row, in order (``[self[i] for i in range(len(self))]``)."""
        return np.delete(np.arange(self.n, dtype=np.int64), self.held)[: self.size]

    def __getitem__(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < self.size:
            raise IndexError(f"training row {i} outside 0..{self.size - 1}")
        return i + int(np.searchsorted(self._shifted, i, side="right"))
