"""Data: bundled benchmarks, encoding and Grain pipelines, replay as a data op."""

from jaxcl.data.pipeline import ReplayMix, batched_stream, encode_all, encode_example, eval_batches

__all__ = ["ReplayMix", "batched_stream", "encode_all", "encode_example", "eval_batches"]
