"""The persistent XLA compilation cache and compile-time accounting.

Every stage builds its own jitted train step and evaluation functions; stages and ``compare:``
variants with the same shapes lower to the same HLO, and the persistent cache
(``jax_compilation_cache_dir``) then hands back the executable compiled the first time instead
of compiling it again, within one run and across runs. JAX's defaults keep only entries that
took at least a second to compile, which drops most CPU programs; :func:`enable` keeps every
entry.

:class:`CompileClock` adds up what compilation costs a run, from JAX's monitoring events:
tracing (``jaxpr_trace_duration``), lowering to MLIR (``jaxpr_to_mlir_module_duration``) and the
XLA compile or cache read (``backend_compile_duration``), plus the persistent cache's hits and
misses.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.monitoring

TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
BACKEND_EVENT = "/jax/core/compile/backend_compile_duration"
HIT_EVENT = "/jax/compilation_cache/cache_hits"
REQUEST_EVENT = "/jax/compilation_cache/compile_requests_use_cache"
SAVED_EVENT = "/jax/compilation_cache/compile_time_saved_sec"


def default_cache_dir() -> Path:
    """``$JAXCL_CACHE_DIR/xla``, else ``$XDG_CACHE_HOME/jaxcl/xla``, else
    ``~/.cache/jaxcl/xla``: shared by every run of this user."""
    if root := os.environ.get("JAXCL_CACHE_DIR"):
        return Path(root) / "xla"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxcl" / "xla"


def resolve(setting: bool | str | None, out_dir: str | Path | None = None) -> Path | None:
    """The cache folder a recipe's ``compile_cache`` names: ``True`` (the default) the user's
    cache dir (:func:`default_cache_dir`), ``"run"`` the run folder's ``xla_cache``, another
    string that folder, ``False``/``None`` no persistent cache."""
    if setting is None or setting is False:
        return None
    if setting is True:
        return default_cache_dir()
    if setting == "run":
        if out_dir is None:
            raise ValueError("compile_cache: 'run' needs the run's out_dir")
        return Path(out_dir) / "xla_cache"
    return Path(os.path.expanduser(str(setting)))


def enable(path: str | Path | None) -> Path | None:
    """Point JAX's persistent compilation cache at ``path`` (created if need be) and keep every
    entry (no minimum compile time or size); ``None`` turns it off. Returns the folder in use.
    An unusable folder (not writable) turns the cache off rather than failing the run."""
    from jax._src import compilation_cache

    current = jax.config.jax_compilation_cache_dir
    target = None
    if path is not None:
        target = Path(path)
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError:
            target = None
        if target is not None and not os.access(target, os.W_OK | os.X_OK):
            target = None
    wanted = None if target is None else str(target)
    if wanted != current:
        jax.config.update("jax_compilation_cache_dir", wanted)
        compilation_cache.reset_cache()  # the cache object binds its folder on first use
    if target is not None:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return target


@dataclass
class CompileClock:
    """Seconds spent tracing, lowering and compiling (or reading the persistent cache) while
    :meth:`running`; ``compiles`` counts backend compiles (cache reads included), ``hits`` and
    ``misses`` the persistent cache's answers."""

    trace_s: float = 0.0
    lower_s: float = 0.0
    backend_s: float = 0.0
    compiles: int = 0
    hits: int = 0
    requests: int = 0
    saved_s: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def misses(self) -> int:
        """Compiles that looked in the persistent cache and did not find their program."""
        return self.requests - self.hits

    @property
    def total_s(self) -> float:
        return self.trace_s + self.lower_s + self.backend_s

    def _duration(self, event: str, seconds: float, **_: object) -> None:
        with self._lock:
            if event == TRACE_EVENT:
                self.trace_s += seconds
            elif event == LOWER_EVENT:
                self.lower_s += seconds
            elif event == BACKEND_EVENT:
                self.backend_s += seconds
                self.compiles += 1
            elif event == SAVED_EVENT:
                self.saved_s += seconds

    def _event(self, event: str, **_: object) -> None:
        with self._lock:
            if event == HIT_EVENT:
                self.hits += 1
            elif event == REQUEST_EVENT:
                self.requests += 1

    def __enter__(self) -> CompileClock:
        jax.monitoring.register_event_duration_secs_listener(self._duration)
        jax.monitoring.register_event_listener(self._event)
        return self

    def __exit__(self, *exc: object) -> None:
        jax.monitoring.unregister_event_duration_listener(self._duration)
        jax.monitoring.unregister_event_listener(self._event)

    def summary(self) -> dict[str, float | int]:
        """The figures for ``results.json`` and the log."""
        return {
            "compile_seconds": round(self.total_s, 2),
            "trace_seconds": round(self.trace_s, 2),
            "lower_seconds": round(self.lower_s, 2),
            "backend_compile_seconds": round(self.backend_s, 2),
            "compilations": self.compiles,
            "cache_hits": self.hits,
            "cache_misses": self.misses,
            "compile_seconds_saved": round(self.saved_s, 2),
        }

    def line(self) -> str:
        """One log line: ``compile 12.3s (trace 1.0s, lower 0.5s, XLA 10.8s) in 40 compiles;
        persistent cache 25 hits, 15 misses (saved 20.1s)``."""
        text = (
            f"compile {self.total_s:.1f}s (trace {self.trace_s:.1f}s, lower {self.lower_s:.1f}s, "
            f"XLA {self.backend_s:.1f}s) in {self.compiles} compiles"
        )
        if self.hits or self.misses:
            text += (
                f"; persistent cache {self.hits} hits, {self.misses} misses "
                f"(saved {self.saved_s:.1f}s)"
            )
        return text
