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
import typing
from pathlib import Path
from typing import Any

from toyjax.config_rules import all_keys, problems


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


def _unknown_key(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(Config), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(all_keys(Config))}"
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


def validate(config: Config) -> Config:
    """Returns the config unchanged if every value is usable; else raises one ConfigError naming each bad key."""
    found = problems(config)
    if found:
        raise ConfigError("; ".join(found))
    return config


def save(config: Config, path: str | Path) -> None:
    Path(path).write_text(config.to_json())


def load(path: str | Path) -> Config:
    return from_dict(json.loads(Path(path).read_text()))
