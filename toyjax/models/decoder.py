"""A GPT-style pre-LN decoder whose attention and feed-forward parts are picked by name from the config."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from toyjax.config import ModelConfig
from toyjax.models import registry
from toyjax.models.attention import apply_rotary
from toyjax.models.hooks import HookPoint
from toyjax.models.kv_cache import KVCache


class SelfAttention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, *, decode: bool = False):
        cfg = self.cfg
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"model.d_model={cfg.d_model} is not divisible by model.n_heads={cfg.n_heads}")
        head_dim = cfg.d_model // cfg.n_heads
        dtype = jnp.dtype(cfg.dtype)
        qkv = nn.DenseGeneral((3, cfg.n_heads, head_dim), dtype=dtype, name="qkv")(x)  # [b, l, 3, h, d]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q, k, v = HookPoint(name="hook_q")(q), HookPoint(name="hook_k")(k), HookPoint(name="hook_v")(v)
        if cfg.positions == "rotary":
            q, k = apply_rotary(q, positions), apply_rotary(k, positions)
            q, k = HookPoint(name="hook_rot_q")(q), HookPoint(name="hook_rot_k")(k)

        def hook(name, x, *, editable=True):  # lets the attention kind expose its scores, pattern, ...
            return HookPoint(editable=editable, name=f"hook_{name}")(x)

        if decode:  # attend to every cached key so far (toyjax/models/kv_cache.py)
            k, v = KVCache(name="kv_cache")(k, v, positions[:, 0])
            out, extras = registry.get_cached_attention(cfg.attention)(q, k, v, positions, cfg=cfg)
        else:
            out, extras = registry.get_attention(cfg.attention)(q, k, v, causal=True, cfg=cfg, hook=hook)
        for name, value in extras.items():
            self.sow("intermediates", name, value)
        out = HookPoint(name="hook_z")(out)
        return nn.DenseGeneral(cfg.d_model, axis=(-2, -1), dtype=dtype, name="out")(out)


class Block(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, deterministic: bool, decode: bool = False):  # positional: nn.remat
        cfg = self.cfg
        x = HookPoint(name="hook_resid_pre")(x)
        h = SelfAttention(cfg, name="attention")(nn.LayerNorm(name="ln_attention")(x), positions, decode=decode)
        h = HookPoint(name="hook_attn_out")(h)
        x = HookPoint(name="hook_resid_mid")(x + nn.Dropout(cfg.dropout)(h, deterministic=deterministic))
        self.sow("intermediates", "resid_mid", x)
        h = registry.get_ffn(cfg.ffn)(cfg=cfg, name="ffn")(nn.LayerNorm(name="ln_ffn")(x), deterministic=deterministic,
                                                               decode=decode)
        h = HookPoint(name="hook_mlp_out")(h)
        x = HookPoint(name="hook_resid_post")(x + nn.Dropout(cfg.dropout)(h, deterministic=deterministic))
        self.sow("intermediates", "resid_post", x)
        return x


class Decoder(nn.Module):
    """tokens [batch, length] (+ grammar state features [batch, length, F]) -> logits [batch, length, vocab].

    decode=True: tokens continue each row of a KV cache (apply with mutable=["cache"]; see models/kv_cache.py).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens, *, state_features=None, deterministic: bool = True, decode: bool = False):
        cfg = self.cfg
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size is unset; it is normally taken from the tokenizer")
        if tokens.shape[1] > cfg.max_len:
            raise ValueError(f"input length {tokens.shape[1]} exceeds model.max_len={cfg.max_len}")
        dtype = jnp.dtype(cfg.dtype)
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=nn.initializers.normal(0.02), name="embed")
        x = HookPoint(name="hook_embed")(embed(tokens))
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        if decode:  # each row continues from its own position, kept in the 'cache' collection (kv_cache.py)
            next_position = self.variable("cache", "next_position", jnp.zeros, tokens.shape[:1], jnp.int32)
            positions = positions + next_position.value[:, None]
            next_position.value = next_position.value + tokens.shape[1]
        if cfg.positions == "learned":
            position_embed = nn.Embed(cfg.max_len, cfg.d_model, embedding_init=nn.initializers.normal(0.02),
                                      name="position")
            x = x + HookPoint(name="hook_pos_embed")(position_embed(positions))
        elif cfg.positions != "rotary":
            raise ValueError(f"model.positions must be 'learned' or 'rotary', got {cfg.positions!r}")
        if cfg.grammar_state_embedding:
            if state_features is None:
                raise ValueError("model.grammar_state_embedding is set but no grammar state features were given")
            for i, size in enumerate(cfg.grammar_feature_sizes):
                x = x + nn.Embed(size, cfg.d_model, embedding_init=nn.initializers.normal(0.02),
                                 name=f"grammar_feature_{i}")(state_features[..., i])
        x = nn.Dropout(cfg.dropout)(x.astype(dtype), deterministic=deterministic)
        block = nn.remat(Block, static_argnums=(3, 4)) if cfg.remat else Block  # model.remat: jax.checkpoint each block
        for i in range(cfg.n_layers):
            x = block(cfg, name=f"block_{i}")(x, positions, deterministic, decode)
        x = HookPoint(name="ln_final_hook_normalized")(nn.LayerNorm(name="ln_final")(x))
        if cfg.tie_embeddings:
            logits = embed.attend(x.astype(jnp.float32))
        else:
            logits = nn.Dense(cfg.vocab_size, name="unembed")(x)
        return logits.astype(jnp.float32)


def init_params(model: Decoder, seed: int = 0):
    """Returns freshly initialised params of model (its shapes at model.cfg.max_len), drawn from jax.random.key(seed)."""
    cfg = model.cfg
    dummy = jnp.zeros((1, cfg.max_len), jnp.int32)
    features = None
    if cfg.grammar_state_embedding:
        features = jnp.zeros((1, cfg.max_len, len(cfg.grammar_feature_sizes)), jnp.int32)
    return model.init(jax.random.key(seed), dummy, state_features=features)["params"]
