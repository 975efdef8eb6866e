"""BERT encoder and masked-LM head in flax.linen, and `Bert`: a loaded model with its tokenizer.

    bert = toyjax.bert.load()                     # packaged all-MiniLM-L6-v2 (encoder only, no MLM head)
    bert = toyjax.bert.load("runs/bert_adapt/hf")  # any folder: config.json + model.safetensors
    bert.hidden_states(["a cat sat ."])           # [batch, length, hidden], padded as the folder's tokenizer pads
    bert.masked_log_probs(ids, mask, positions)   # log-softmax over word-pieces at the given positions

Post-LN blocks and exact (erf) GELU as in the original BERT. Hugging Face names and folders: hf.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

from toyjax.bert.hf import BertConfig, default_path, load_tokenizer, params_from_tensors, read_tensors, write_folder

MASK_TOKEN = "[MASK]"
ADAPT_COMMAND = "python launch.py bert-adapt --config experiments/configs/bert_adapt.py --workdir DIR"


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


def init_params(config: BertConfig, seed: int = 0) -> dict:
    """Returns freshly initialised parameters of the encoder and MLM head (flax defaults)."""
    return BertModule(config).init(jax.random.PRNGKey(seed), jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2)))["params"]


# --------------------------------------------------------------------------------------- a loaded model
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
        self._layer_states = jax.jit(lambda p, ids, mask: self.module.apply({"params": p}, ids, mask, method="encode"))
        self._masked_log_probs = jax.jit(self._masked_log_probs_fn)

    def _special_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer of {self.folder} has no {token} token")
        return token_id

    def _masked_log_probs_fn(self, params, ids, mask, positions, position_ids):
        hidden = self.mlm_module.apply({"params": params}, ids, mask, None, positions, position_ids, method="encode")[-1]
        logits = self.mlm_module.apply({"params": params}, hidden[:, 0] if positions.ndim == 1 else hidden,
                                       method="mlm_logits")
        return jax.nn.log_softmax(logits, axis=-1)

    def layer_states(self, ids, attention_mask, params=None) -> list[jax.Array]:
        """Returns [embeddings, layer 1, ..., layer N], each [batch, length, hidden], for word-piece ids (jitted).

        params: other parameters of the same shapes (e.g. during adaptation); default the loaded ones.
        """
        return self._layer_states(self.params if params is None else params, ids, attention_mask)

    def masked_log_probs(self, ids, attention_mask, positions, position_ids=None, params=None) -> jax.Array:
        """Returns log-softmax over word-pieces at positions: [batch, vocab] for positions [batch], [batch, n, vocab]
        for [batch, n] (jitted; needs the MLM head).

        attention_mask may hold segment ids of packed rows, with position_ids restarting per row
        (see `BertModule.encode`); the last layer and the head run only at the positions.
        """
        return self._masked_log_probs(self.params if params is None else params, ids, attention_mask, positions,
                                      position_ids)

    def require_mlm_head(self):
        if not self.has_mlm_head:
            raise ValueError(f"{self.folder} has no MLM head (cls.predictions.*): hidden states work, masked-token "
                             f"probabilities do not. Adapt it first ({ADAPT_COMMAND}), then load DIR/hf "
                             "(or use any BERT folder with an MLM head).")

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
        return [np.asarray(h) for h in self.layer_states(batch["input_ids"], batch["attention_mask"])]

    def hidden_states(self, texts: list[str]) -> np.ndarray:
        """Returns the last layer's hidden states [batch, length, hidden]."""
        return self.all_hidden_states(texts)[-1]

    def pieces(self, text: str) -> list[int]:
        """Returns the word-piece ids of `text` without special tokens."""
        return self.piece_tokenizer.encode(text, add_special_tokens=False).ids


def load(path: str | Path | None = None) -> Bert:
    """Returns a Bert from a Hugging Face BERT folder (None = the packaged all-MiniLM-L6-v2)."""
    folder = default_path() if path is None else Path(path)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder}: no config.json (expected a Hugging Face BERT folder)")
    config = BertConfig.from_json(folder / "config.json")
    tensors, source = read_tensors(folder)
    expected = jax.eval_shape(lambda: init_params(config))
    params, has_mlm_head = params_from_tensors(config, tensors, expected, str(source))
    if not has_mlm_head:
        print(f"note: {source} has no MLM head (cls.predictions.*); the encoder is usable, masked-token "
              f"probabilities need an adapted model ({ADAPT_COMMAND})")
    return Bert(config, jax.tree.map(jnp.asarray, params), load_tokenizer(folder), has_mlm_head, folder)


def write_random_folder(folder, words: list[str], config: BertConfig | None = None, seed: int = 0,
                        with_mlm_head: bool = True) -> Path:
    """Returns the folder after writing a random-weight BERT there (config.json, model.safetensors, vocab.txt),
    for tests and smoke runs.

    The vocabulary is the five BERT specials followed by `words` (use '##x' for continuation pieces).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    config = config or BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    params = init_params(config, seed)
    params = jax.tree.map(lambda x: x + 0.5 * jax.random.normal(jax.random.PRNGKey(seed + 1), x.shape), params)
    if not with_mlm_head:
        params = {k: v for k, v in params.items() if not k.startswith("mlm_")}
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return write_folder(config, params, folder)
