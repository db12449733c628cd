"""Offline benchmark generators (deterministic, no downloads)."""

from jaxcl.data.benchmarks.quickstart import GENERATORS, generate, kind_of

__all__ = ["GENERATORS", "generate", "kind_of"]
