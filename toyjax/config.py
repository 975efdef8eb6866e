"""Typed experiment configs: sections data, tokenizer, model, train, mesh (and bert_adapt), every default in one place.

A config file is a Python file with a docstring (the command that runs it and what to expect) and a
`get_config() -> Config`. Command-line overrides look like `--config.model.d_model=256`; values are parsed
with the type of the field they replace, and an unknown key is an error that names the nearest valid key
(also when a config file sets an attribute that is not a field). Every way of building a config
(load_config_file, apply_overrides, from_dict, load) ends in `validate`, so a bad value is a ConfigError
naming the key and what is allowed before any data is read or anything is compiled.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import math
import typing
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config key or value that cannot be used."""


class _Section:
    """Rejects attributes that are not fields, so `config.model.d_modle = 3` in get_config() is an error."""

    key_prefix = ""  # the section's dotted path in Config; a class attribute, not a field (no annotation)

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in {f.name for f in dataclasses.fields(self)}:
            raise _unknown_key(self.key_prefix + name)
        object.__setattr__(self, name, value)


@dataclasses.dataclass
class DataConfig(_Section):
    key_prefix = "data."
    # "stories" (embedded generator), "structured" (grammar domain), "mixed" (both), a path to a UTF-8 text
    # file or folder, or "hf:NAME" (Hugging Face datasets, optional and online only).
    source: str = "stories"
    n_stories: int = 20_000  # embedded generator: stories to generate
    generator_seed: int = 0
    structured_share: float = 0.0  # "mixed": share of documents from the structured domain
    valid_fraction: float = 0.05  # documents held out for validation (chosen by a seeded hash)
    max_documents: int = 0  # 0 = all


@dataclasses.dataclass
class TokenizerConfig(_Section):
    key_prefix = "tokenizer."
    kind: str = "topword"  # "topword" or "phrase"
    vocab_size: int = 1024  # specials + top words (the base vocabulary for kind="phrase")
    lowercase: bool = True
    simplify: str = "nearest"  # "unk", "nearest", "contextual"
    bert_model: str = ""  # simplify="contextual": a BERT folder with an MLM head ("" = $TOYJAX_BERT)
    phrase_vocab_size: int = 0  # kind="phrase": phrases added on top of the top words


# Model configs hash by value: a Decoder holding one can be a static argument of jax.jit.
@dataclasses.dataclass(unsafe_hash=True)
class MoEConfig(_Section):
    key_prefix = "model.moe."
    n_experts: int = 8
    top_k: int = 2
    router: str = "noisy_topk"  # "noisy_topk" (Shazeer et al. 2017) or "switch" (Fedus et al. 2021)
    capacity_factor: float = 1.25  # 0 = dropless
    dispatch: str = "auto"  # "auto", "einsum" (with capacity) or "sort" (sort/gather)
    noise: bool = True  # noisy gating in training (noisy_topk)
    importance_coef: float = 0.01  # Shazeer importance loss weight
    load_coef: float = 0.01  # Shazeer load loss weight
    balance_coef: float = 0.01  # Switch load-balancing loss alpha
    z_loss_coef: float = 1e-3  # ST-MoE router z-loss weight


@dataclasses.dataclass(unsafe_hash=True)
class ModelConfig(_Section):
    key_prefix = "model."
    vocab_size: int = 0  # 0 = taken from the tokenizer
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 512
    max_len: int = 128  # context length, also the training window
    dropout: float = 0.0
    tie_embeddings: bool = True
    positions: str = "learned"  # "learned" or "rotary"
    dtype: str = "float32"  # compute dtype; params stay float32
    attention: str = "dense"  # registry name, see toyjax.models.registry
    attention_top_k: int = 8
    attention_query_chunk: int = 0  # 0 = unchunked
    ffn: str = "dense"  # registry name
    moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)
    grammar_state_embedding: bool = False  # add embedded grammar-state features to the inputs
    grammar_feature_sizes: tuple[int, ...] = ()  # filled in from the compiled grammar
    remat: bool = False  # recompute each block's activations in the backward pass: less memory, ~1/3 more compute


@dataclasses.dataclass
class TrainConfig(_Section):
    key_prefix = "train."
    steps: int = 2000
    batch_size: int = 32
    seed: int = 0
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    b2: float = 0.98
    loss: str = "full"  # "full" or "valid_subset" (grammar-valid next tokens only)
    eval_every: int = 250
    eval_batches: int = 8
    log_every: int = 50
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    n_samples: int = 4
    sample_length: int = 80
    sample_temperature: float = 0.8


@dataclasses.dataclass
class BertAdaptConfig(_Section):
    """`launch.py bert-adapt`: masked-LM adaptation of a BERT on a corpus (see toyjax.bert.adapt)."""

    corpus: str = ""  # UTF-8 text file to adapt on (required)
    base: str = ""  # Hugging Face BERT folder ("" = the packaged all-MiniLM-L6-v2)
    steps: int = 1050  # length of the learning-rate schedule
    batch_size: int = 32
    seq_len: int = 64  # word-pieces per row, [CLS] and [SEP] included
    learning_rate: float = 3e-4
    warmup_steps: int = 30
    mask_rate: float = 0.4  # fraction of pieces masked (80 % [MASK], 10 % random, 10 % kept)
    time_budget_min: float = 0.0  # stop after this much wall time, evaluation included, across resumes; 0 = none
    eval_every: int = 200
    save_every: int = 100
    n_eval: int = 1000  # held-out masked words evaluated
    seed: int = 0


@dataclasses.dataclass
class MeshConfig(_Section):
    """How many ways each device-mesh axis splits the work (see toyjax.sharding); -1 = the devices left over."""

    key_prefix = "mesh."
    data: int = -1  # splits the batch
    fsdp: int = 1  # splits the batch, and params and optimizer state along d_model
    expert: int = 1  # splits the batch, and MoE expert weights along their expert axis


@dataclasses.dataclass
class Config(_Section):
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    bert_adapt: BertAdaptConfig = dataclasses.field(default_factory=BertAdaptConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
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


def _unknown_key(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(all_keys())}"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _parse_value(text: str, kind: Any, key: str) -> Any:
    try:
        if kind is bool:
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is str:
            return text
        if typing.get_origin(kind) is tuple:
            parts = [p for p in text.strip("()[] ").split(",") if p.strip()]
            return tuple(int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"config key '{key}' expects {getattr(kind, '__name__', kind)}, got {text!r}") from None
    raise ConfigError(f"config key '{key}' has a type ({kind}) that cannot be set from the command line")


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """Checks a value loaded from JSON or Python against the field type."""
    if isinstance(value, str) and kind is not str:
        return _parse_value(value, kind, key)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typing.get_origin(kind) is tuple and isinstance(value, list | tuple):
        return tuple(value)
    if kind in (int, float, bool, str) and not isinstance(value, kind):
        raise ConfigError(f"config key '{key}' expects {kind.__name__}, got {value!r}")
    return value


def set_key(config: Config, key: str, value: Any) -> None:
    """Sets a dotted key in place (value: a string from the command line, or an already typed value)."""
    parts = key.split(".")
    node = config
    for depth, part in enumerate(parts):
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            raise _unknown_key(key)
        kind = typing.get_type_hints(type(node))[part]
        if depth == len(parts) - 1:
            if dataclasses.is_dataclass(kind):
                raise ConfigError(f"config key '{key}' is a section; set one of its keys, e.g. '{key}.{dataclasses.fields(kind)[0].name}'")
            setattr(node, part, _coerce(value, kind, key))
        else:
            node = getattr(node, part)


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Applies `config.a.b=value` or `--config.a.b=value` strings (the `config.` prefix is optional)."""
    for item in overrides:
        text = item.lstrip("-")
        if "=" not in text:
            raise ConfigError(f"override {item!r} must look like --config.model.d_model=256")
        key, value = text.split("=", 1)
        key = key.removeprefix("config.")
        set_key(config, key, value)
    return validate(config)


def from_dict(values: dict) -> Config:
    """Builds a Config from a (possibly partial) nested dict, rejecting unknown keys."""
    config = Config()

    def walk(prefix: str, node: dict) -> None:
        for name, value in node.items():
            key = f"{prefix}{name}"
            if isinstance(value, dict):
                walk(key + ".", value)
            else:
                set_key(config, key, value)

    walk("", values)
    return validate(config)


def load_config_file(path: str | Path) -> Config:
    """Runs a config file's get_config()."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"toyjax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} has no get_config() function")
    try:  # an unknown attribute set in get_config() or a bad value: name the file too
        config = module.get_config()
        if not isinstance(config, Config):
            raise ConfigError(f"get_config() must return toyjax.config.Config, got {type(config).__name__}")
        return validate(config)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


# -- validation ------------------------------------------------------------------------------------------------

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


def get_key(config: Config, key: str) -> Any:
    """Returns the value at a dotted key, e.g. get_key(config, 'model.moe.top_k')."""
    node = config
    for part in key.split("."):
        node = getattr(node, part)
    return node


def in_interval(value: float, interval: str) -> bool:
    """Returns whether value lies in an interval written like '[0, 1)' or '(0, inf)'."""
    low, high = (float(x) for x in interval[1:-1].split(","))
    above = value >= low if interval[0] == "[" else value > low
    below = value <= high if interval[-1] == "]" else value < high
    return above and below


def _describe(interval: str) -> str:
    low, high = (x.strip() for x in interval[1:-1].split(","))
    if high == "inf":
        return f"must be {'>=' if interval[0] == '[' else '>'} {low}"
    return f"must be in {interval}"


def _type_problems(config: Config) -> list[str]:
    problems = []
    for key in all_keys():
        kind, value = _field_type(key), get_key(config, key)
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


def _field_type(key: str) -> Any:
    node, *parts, leaf = [Config] + key.split(".")
    for part in parts:
        node = typing.get_type_hints(node)[part]
    return typing.get_type_hints(node)[leaf]


def _choice_problems(config: Config) -> list[str]:
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


def _cross_field_problems(config: Config) -> list[str]:
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


def _mesh_problems(config: Config) -> list[str]:
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


def validate(config: Config) -> Config:
    """Returns the config unchanged if every value is usable; else raises one ConfigError naming each bad key."""
    problems = _type_problems(config)
    if not problems:  # ranges and rules compare values, so they need the right types first
        problems = [f"{key}={get_key(config, key)!r} {_describe(interval)}"
                    for key, interval in RANGES.items() if not in_interval(get_key(config, key), interval)]
        problems += _choice_problems(config) + _cross_field_problems(config)
    if problems:
        raise ConfigError("; ".join(problems))
    return config


def save(config: Config, path: str | Path) -> None:
    Path(path).write_text(config.to_json())


def load(path: str | Path) -> Config:
    return from_dict(json.loads(Path(path).read_text()))
