"""Suite-wide settings: one persistent XLA compilation cache for every test and subprocess.

Most tests build the same tiny models and compile the same train steps; XLA compiles on one
thread, so compilation dominates the suite's time. With a persistent cache, an executable compiled
by one test (or one xdist worker, or a ``jaxcl`` subprocess, which inherits the environment) is
read back by the next test that lowers the same program. Entries are keyed by the program, the
compile options and the jax/jaxlib versions, so a stale entry is never used. Set
``JAX_COMPILATION_CACHE_DIR`` yourself to move it, or to an empty string to turn it off.
"""

from __future__ import annotations

import os
import tempfile

_DEFAULT_DIR = os.path.join(tempfile.gettempdir(), f"jaxcl-test-xla-cache-{os.getuid()}")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _DEFAULT_DIR)
# keep every entry, however small or quick to compile (the defaults skip what CPU compiles)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
