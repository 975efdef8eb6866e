"""toyjax: small-language-model interpretability experiments in JAX/Flax.

The everyday API, from any directory once `pip install -e .` has run:

    import toyjax
    run = toyjax.load_run("runs/quickstart")             # config, params, tokenizer, step, model (a Decoder)
    logits = run.model.apply({"params": run.params}, tokens)
    tokens = toyjax.sample(run.model, run.params, [run.tokenizer.eos_id], n=4, key=jax.random.key(0))

    config = toyjax.Config()                             # typed sections: data, tokenizer, model, train, mesh, ...
    model = toyjax.Decoder(config.model)                 # a flax.linen module; toyjax.init_params(model, seed)
    bert = toyjax.load_bert()                            # the Flax BERT (toyjax.bert has the rest)

Deeper: toyjax.interp (run_with_cache, run_with_hooks, logit lens, patching), toyjax.evaluate / toyjax.compare,
toyjax.sweep, toyjax.fuzz, toyjax.sharding. Names load lazily, so `import toyjax.config` stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Config": ("toyjax.config", "Config"),
    "Decoder": ("toyjax.models.decoder", "Decoder"),
    "init_params": ("toyjax.models.decoder", "init_params"),
    "Run": ("toyjax.runs", "Run"),
    "load_run": ("toyjax.runs", "load_run"),
    "sample": ("toyjax.sample", "sample"),
    "load_bert": ("toyjax.bert", "load"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'toyjax' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
