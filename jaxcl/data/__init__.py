"""Data: sources, encoding and Grain pipelines, packing, replay as data ops, benchmarks.

The names below load their module on first use (PEP 562), so code that needs one piece (a
replay buffer, packing) does not import Grain with it."""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> the submodule that defines it
_SOURCES = {
    "global_batch": "distributed",
    "process_shard": "distributed",
    "pack_examples": "packing",
    "packing_efficiency": "packing",
    "ReplayMix": "pipeline",
    "batched_stream": "pipeline",
    "encode_all": "pipeline",
    "encode_example": "pipeline",
    "eval_batches": "pipeline",
    "RatioScheduleSpec": "replay",
    "ReplayBuffer": "replay",
    "common_prefix": "replay",
    "make_generate_fn": "replay",
    "pseudo_replay": "replay",
    "ratio_schedule": "replay",
    "ExampleSource": "sources",
    "FieldMap": "sources",
    "pipeline_throughput": "throughput",
}


def __getattr__(name: str) -> Any:
    if name not in _SOURCES:
        raise AttributeError(f"module 'jaxcl.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"jaxcl.data.{_SOURCES[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SOURCES))


__all__ = sorted(_SOURCES)
