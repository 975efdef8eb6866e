"""toyjax: small-language-model interpretability experiments in JAX/Flax."""

from toyjax.runs import Run, load_run

__all__ = ["Run", "load_run"]
