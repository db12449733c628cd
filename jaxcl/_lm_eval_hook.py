"""Make ``lm_eval --model jaxcl`` work: lm-eval 0.4 finds models only in its own registry and
loads no plugins, so jaxcl's install puts ``jaxcl-lm-eval.pth`` in site-packages, whose one
line imports this module at interpreter start-up. It imports nothing heavy: it waits, as an
import hook, for ``lm_eval.models`` (the module that fills lm-eval's model registry) to be
executed, then registers ``jaxcl`` lazily, by import path, so that JAX is imported only when
an evaluation asks for the model. Processes that never import lm-eval pay one finder on
``sys.meta_path`` and nothing else.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

WATCHED = "lm_eval.models"
TARGET = "jaxcl.eval.harness:JaxclLM"


def register_jaxcl() -> None:
    """``jaxcl`` in lm-eval's model registry, as a lazy placeholder (a no-op once there)."""
    from lm_eval.api.registry import model_registry

    if "jaxcl" not in model_registry:
        model_registry.register("jaxcl", target=TARGET)


class _RegisteringLoader(importlib.abc.Loader):
    """The real loader of ``lm_eval.models``, then :func:`register_jaxcl`."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        try:
            register_jaxcl()
        except Exception as err:  # never break lm-eval's own models over jaxcl's
            print(f"jaxcl: could not register the lm-eval model 'jaxcl': {err}", file=sys.stderr)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != WATCHED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once); registers at once if lm-eval's models
    are already imported."""
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    if WATCHED in sys.modules:
        register_jaxcl()
    else:
        sys.meta_path.insert(0, _Finder())


install()
