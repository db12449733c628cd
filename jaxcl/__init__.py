"""jaxcl: continual learning for large language models in JAX.

Three chained stages (continual pretraining, instruction tuning, alignment); every method an
optax transform, a Grain data op or an objective; recipes in YAML; Orbax checkpoints chain the
stages.

``import jaxcl`` loads nothing else: every public subpackage (``jaxcl.models``,
``jaxcl.methods``, ``jaxcl.objectives``, ``jaxcl.data``, ``jaxcl.eval``, ``jaxcl.train``) and
module (``jaxcl.recipe``, ``jaxcl.checkpoint``...) is imported on first attribute access, so the
CLI starts without paying for JAX.
"""

import importlib as _importlib

__version__ = "0.1.0"

#: subpackages reachable as attributes of the package, imported on first use
SUBPACKAGES = ("data", "eval", "methods", "models", "objectives", "train")
#: public top-level modules, likewise
MODULES = (
    "bench",
    "checkpoint",
    "compare",
    "convert",
    "evaluate",
    "parallel",
    "plan",
    "recipe",
    "report",
    "spec",
)

__all__ = ["__version__", "generate", *SUBPACKAGES, *MODULES]


def __getattr__(name: str):
    # Lazy (PEP 562), so that `import jaxcl` (the CLI) does not pay for importing JAX.
    if name == "generate":
        from jaxcl.models.generate import generate

        return generate
    if name in SUBPACKAGES or name in MODULES:
        # importing a submodule also binds it on the package: later lookups skip this hook
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'jaxcl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*(k for k in globals() if not k.startswith("_")), *__all__})
