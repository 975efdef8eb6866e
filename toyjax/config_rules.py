"""What values a config may hold: the allowed choices, the numeric ranges and the rules across fields.

toyjax.config.validate applies them (every way of building a config ends there); the functions here take any
config dataclass and return the problems as messages that name the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any


def get_key(config, key: str) -> Any:
    """Returns the value at a dotted key, e.g. get_key(config, 'model.moe.top_k')."""
    node = config
    for part in key.split("."):
        node = getattr(node, part)
    return node


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Returns every dotted leaf key of a config dataclass, e.g. 'model.moe.top_k'."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            keys += all_keys(kind, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


# Allowed values of the string fields whose choices live here; attention and ffn kinds come from the registry,
# tokenizer kinds and simplification strategies from toyjax.tokenizers.
POSITIONS = ("learned", "rotary")
DTYPES = ("float32", "bfloat16", "float16")
MOE_ROUTERS = ("noisy_topk", "switch")
MOE_DISPATCHES = ("auto", "einsum", "sort")
LOSSES = ("full", "valid_subset")
GRAMMAR_SOURCES = ("structured", "mixed")  # data sources that come with grammar states
MIN_TOKENIZER_WORDS = 5  # a vocabulary needs room for a few words beyond the special tokens

# Ranges as intervals; "inf" leaves a side open. Cross-field rules are in _cross_field_problems.
RANGES = {
    "data.n_stories": "[1, inf)", "data.generator_seed": "[0, inf)", "data.structured_share": "[0, 1]",
    "data.valid_fraction": "(0, 1)", "data.max_documents": "[0, inf)",
    "tokenizer.phrase_vocab_size": "[0, inf)",
    "model.vocab_size": "[0, inf)", "model.d_model": "[1, inf)", "model.n_layers": "[1, inf)",
    "model.n_heads": "[1, inf)", "model.d_ff": "[1, inf)", "model.max_len": "[2, inf)", "model.dropout": "[0, 1)",
    "model.attention_query_chunk": "[0, inf)", "model.moe.capacity_factor": "[0, inf)",
    "model.moe.importance_coef": "[0, inf)", "model.moe.load_coef": "[0, inf)", "model.moe.balance_coef": "[0, inf)",
    "model.moe.z_loss_coef": "[0, inf)",
    "train.steps": "[1, inf)", "train.batch_size": "[1, inf)", "train.seed": "[0, inf)",
    "train.learning_rate": "(0, inf)", "train.warmup_steps": "[0, inf)", "train.min_lr_ratio": "[0, 1]",
    "train.weight_decay": "[0, inf)", "train.b2": "[0, 1)", "train.eval_every": "[1, inf)",
    "train.eval_batches": "[1, inf)", "train.log_every": "[1, inf)", "train.checkpoint_every": "[1, inf)",
    "train.keep_checkpoints": "[1, inf)", "train.n_samples": "[0, inf)", "train.sample_length": "[1, inf)",
    "train.sample_temperature": "(0, inf)",
    "bert_adapt.steps": "[1, inf)", "bert_adapt.batch_size": "[1, inf)", "bert_adapt.seq_len": "[3, inf)",
    "bert_adapt.learning_rate": "(0, inf)", "bert_adapt.warmup_steps": "[0, inf)", "bert_adapt.mask_rate": "(0, 1]",
    "bert_adapt.time_budget_min": "[0, inf)", "bert_adapt.eval_every": "[1, inf)", "bert_adapt.save_every": "[1, inf)",
    "bert_adapt.n_eval": "[1, inf)", "bert_adapt.seed": "[0, inf)",
}


def in_interval(value: float, interval: str) -> bool:
    """Returns whether value lies in an interval written like '[0, 1)' or '(0, inf)'."""
    low, high = (float(x) for x in interval[1:-1].split(","))
    above = value >= low if interval[0] == "[" else value > low
    below = value <= high if interval[-1] == "]" else value < high
    return above and below


def describe(interval: str) -> str:
    low, high = (x.strip() for x in interval[1:-1].split(","))
    if high == "inf":
        return f"must be {'>=' if interval[0] == '[' else '>'} {low}"
    return f"must be in {interval}"


def type_problems(config) -> list[str]:
    problems = []
    for key in all_keys(type(config)):
        kind, value = _field_type(type(config), key), get_key(config, key)
        if kind is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif typing.get_origin(kind) is tuple:
            ok = isinstance(value, tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        else:
            ok = isinstance(value, kind)
        if not ok:
            expected = "a finite float" if kind is float else getattr(kind, "__name__", str(kind))
            problems.append(f"{key}={value!r} must be {expected}")
    return problems


def _field_type(root: type, key: str) -> Any:
    node, *parts, leaf = [root] + key.split(".")
    for part in parts:
        node = typing.get_type_hints(node)[part]
    return typing.get_type_hints(node)[leaf]


def _choice_problems(config) -> list[str]:
    from toyjax import tokenizers
    from toyjax.models import registry
    from toyjax.tokenizers import simplify

    model = config.model
    choices = {
        "tokenizer.kind": tuple(tokenizers.TOKENIZER_KINDS),
        # "contextual" registers itself only when imported (it pulls in BERT), as simplify.get_strategy says.
        "tokenizer.simplify": tuple(sorted(simplify.STRATEGIES)) + ("contextual",),
        "model.positions": POSITIONS, "model.dtype": DTYPES, "model.moe.router": MOE_ROUTERS,
        "model.moe.dispatch": MOE_DISPATCHES, "train.loss": LOSSES,
    }
    problems = [f"{key}={get_key(config, key)!r} must be one of {', '.join(map(repr, allowed))}"
                for key, allowed in choices.items() if get_key(config, key) not in allowed]
    for lookup, name in ((registry.get_attention, model.attention), (registry.get_ffn, model.ffn)):
        try:
            lookup(name)
        except ValueError as err:  # the registry's message names the key and the registered kinds
            problems.append(str(err))
    return problems


def _cross_field_problems(config) -> list[str]:
    from toyjax.tokenizers.topword import SPECIALS

    data, model, moe = config.data, config.model, config.model.moe
    problems = []
    if not data.source.strip() or data.source.strip() == "hf:":
        problems.append(f"data.source={data.source!r} must name a corpus: 'stories', 'structured', 'mixed', "
                        "a text file or folder, or 'hf:NAME'")
    min_vocab = len(SPECIALS) + MIN_TOKENIZER_WORDS
    if config.tokenizer.vocab_size < min_vocab:
        problems.append(f"tokenizer.vocab_size={config.tokenizer.vocab_size} must be >= {min_vocab} "
                        f"(the {len(SPECIALS)} special tokens plus at least {MIN_TOKENIZER_WORDS} words)")
    if model.d_model >= 1 and model.n_heads >= 1:
        if model.d_model % model.n_heads:
            problems.append(f"model.n_heads={model.n_heads} must divide model.d_model={model.d_model}")
        elif model.positions == "rotary" and (model.d_model // model.n_heads) % 2:
            problems.append(f"model.positions='rotary' needs an even head size, but model.d_model={model.d_model} / "
                            f"model.n_heads={model.n_heads} = {model.d_model // model.n_heads}")
    if model.attention == "topk" and model.attention_top_k < 1:
        problems.append(f"model.attention_top_k={model.attention_top_k} must be >= 1 with model.attention='topk'")
    if model.ffn == "moe":
        if moe.n_experts < 1:
            problems.append(f"model.moe.n_experts={moe.n_experts} must be >= 1 with model.ffn='moe'")
        elif not 1 <= moe.top_k <= moe.n_experts:
            problems.append(f"model.moe.top_k={moe.top_k} must be between 1 and model.moe.n_experts={moe.n_experts}")
    if any(size < 1 for size in model.grammar_feature_sizes):
        problems.append(f"model.grammar_feature_sizes={model.grammar_feature_sizes} must all be >= 1")
    for key, wanted in (("train.loss", "valid_subset"), ("model.grammar_state_embedding", True)):
        if get_key(config, key) == wanted and data.source not in GRAMMAR_SOURCES:
            problems.append(f"{key}={wanted!r} needs a grammar: set data.source to one of "
                            f"{', '.join(map(repr, GRAMMAR_SOURCES))} (got {data.source!r})")
    return problems + _mesh_problems(config)


def _mesh_problems(config) -> list[str]:
    """Returns what the mesh sizes get wrong that is knowable without devices (toyjax.sharding checks the rest)."""
    mesh, model = config.mesh, config.model
    sizes = {f"mesh.{axis}": getattr(mesh, axis) for axis in ("data", "fsdp", "expert")}
    problems = [f"{key}={size} must be >= 1, or -1 for the devices the other axes leave"
                for key, size in sizes.items() if size == 0 or size < -1]
    if list(sizes.values()).count(-1) > 1:
        problems.append(f"only one mesh axis may be -1, got {', '.join(f'{k}={v}' for k, v in sizes.items())}")
    if problems:
        return problems
    if mesh.fsdp > 1 and model.d_model % mesh.fsdp:
        problems.append(f"mesh.fsdp={mesh.fsdp} must divide model.d_model={model.d_model} (FSDP splits that axis)")
    if mesh.expert != 1 and model.ffn != "moe":
        problems.append(f"mesh.expert={mesh.expert} splits MoE experts but model.ffn={model.ffn!r}; "
                        "use mesh.data to split the batch")
    elif mesh.expert > 1 and model.moe.n_experts % mesh.expert:
        problems.append(f"mesh.expert={mesh.expert} must divide model.moe.n_experts={model.moe.n_experts}")
    if -1 not in sizes.values():
        ways = mesh.data * mesh.fsdp * mesh.expert
        if config.train.batch_size % ways:
            problems.append(f"train.batch_size={config.train.batch_size} must be divisible by mesh.data x mesh.fsdp "
                            f"x mesh.expert = {ways} (every mesh axis splits the batch)")
    return problems


def problems(config) -> list[str]:
    """Returns every problem of a config (types first: ranges and rules compare values, so they need the types)."""
    found = type_problems(config)
    if found:
        return found
    found = [f"{key}={get_key(config, key)!r} {describe(interval)}"
             for key, interval in RANGES.items() if not in_interval(get_key(config, key), interval)]
    return found + _choice_problems(config) + _cross_field_problems(config)
