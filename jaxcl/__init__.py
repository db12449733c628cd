"""jaxcl: continual learning for large language models in JAX.

Three chained stages (continual pretraining, instruction tuning, alignment); every method an
optax transform, a Grain data op or an objective; recipes in YAML; Orbax checkpoints chain the
stages.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so that `import jaxcl` (the CLI) does not pay for importing JAX.
    if name == "generate":
        from jaxcl.models.generate import generate

        return generate
    raise AttributeError(f"module 'jaxcl' has no attribute {name!r}")
