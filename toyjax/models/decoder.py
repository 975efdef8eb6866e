"""A GPT-style pre-LN decoder whose attention and feed-forward parts are picked by name from the config."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from toyjax.config import ModelConfig
from toyjax.models import registry
from toyjax.models.attention import apply_rotary


class SelfAttention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions):
        cfg = self.cfg
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"model.d_model={cfg.d_model} is not divisible by model.n_heads={cfg.n_heads}")
        head_dim = cfg.d_model // cfg.n_heads
        dtype = jnp.dtype(cfg.dtype)
        qkv = nn.DenseGeneral((3, cfg.n_heads, head_dim), dtype=dtype, name="qkv")(x)  # [b, l, 3, h, d]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if cfg.positions == "rotary":
            q, k = apply_rotary(q, positions), apply_rotary(k, positions)
        out, extras = registry.get_attention(cfg.attention)(q, k, v, causal=True, cfg=cfg)
        for name, value in extras.items():
            self.sow("intermediates", name, value)
        return nn.DenseGeneral(cfg.d_model, axis=(-2, -1), dtype=dtype, name="out")(out)


class Block(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, deterministic: bool):
        cfg = self.cfg
        h = SelfAttention(cfg, name="attention")(nn.LayerNorm(name="ln_attention")(x), positions)
        x = x + nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
        self.sow("intermediates", "resid_mid", x)
        h = registry.get_ffn(cfg.ffn)(cfg=cfg, name="ffn")(nn.LayerNorm(name="ln_ffn")(x), deterministic=deterministic)
        x = x + nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
        self.sow("intermediates", "resid_post", x)
        return x


class Decoder(nn.Module):
    """tokens [batch, length] (+ grammar state features [batch, length, F]) -> logits [batch, length, vocab]."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens, *, state_features=None, deterministic: bool = True):
        cfg = self.cfg
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size is unset; it is normally taken from the tokenizer")
        if tokens.shape[1] > cfg.max_len:
            raise ValueError(f"input length {tokens.shape[1]} exceeds model.max_len={cfg.max_len}")
        dtype = jnp.dtype(cfg.dtype)
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=nn.initializers.normal(0.02), name="embed")
        x = embed(tokens)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        if cfg.positions == "learned":
            x = x + nn.Embed(cfg.max_len, cfg.d_model, embedding_init=nn.initializers.normal(0.02), name="position")(positions)
        elif cfg.positions != "rotary":
            raise ValueError(f"model.positions must be 'learned' or 'rotary', got {cfg.positions!r}")
        if cfg.grammar_state_embedding:
            if state_features is None:
                raise ValueError("model.grammar_state_embedding is set but no grammar state features were given")
            for i, size in enumerate(cfg.grammar_feature_sizes):
                x = x + nn.Embed(size, cfg.d_model, embedding_init=nn.initializers.normal(0.02),
                                 name=f"grammar_feature_{i}")(state_features[..., i])
        x = nn.Dropout(cfg.dropout)(x.astype(dtype), deterministic=deterministic)
        block = nn.remat(Block, static_argnums=(3,)) if cfg.remat else Block  # model.remat: jax.checkpoint each block
        for i in range(cfg.n_layers):
            x = block(cfg, name=f"block_{i}")(x, positions, deterministic)
        x = nn.LayerNorm(name="ln_final")(x)
        if cfg.tie_embeddings:
            logits = embed.attend(x.astype(jnp.float32))
        else:
            logits = nn.Dense(cfg.vocab_size, name="unembed")(x)
        return logits.astype(jnp.float32)
