"""Data: sources, encoding and Grain pipelines, packing, replay as data ops, benchmarks."""

from jaxcl.data.distributed import global_batch, process_shard
from jaxcl.data.packing import pack_examples, packing_efficiency
from jaxcl.data.pipeline import ReplayMix, batched_stream, encode_all, encode_example, eval_batches
from jaxcl.data.replay import (
    RatioScheduleSpec,
    ReplayBuffer,
    common_prefix,
    make_generate_fn,
    pseudo_replay,
    ratio_schedule,
)
from jaxcl.data.sources import ExampleSource, FieldMap
from jaxcl.data.throughput import pipeline_throughput

__all__ = [
    "ExampleSource",
    "FieldMap",
    "RatioScheduleSpec",
    "ReplayBuffer",
    "ReplayMix",
    "batched_stream",
    "common_prefix",
    "encode_all",
    "encode_example",
    "eval_batches",
    "global_batch",
    "make_generate_fn",
    "pack_examples",
    "packing_efficiency",
    "pipeline_throughput",
    "process_shard",
    "pseudo_replay",
    "ratio_schedule",
]
