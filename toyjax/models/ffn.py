"""The dense feed-forward kind: Dense -> GELU -> Dense."""

from __future__ import annotations

from typing import TYPE_CHECKING

import flax.linen as nn
import jax.numpy as jnp

from toyjax.models.hooks import HookPoint
from toyjax.models.registry import register_ffn

if TYPE_CHECKING:  # an annotation only: config validates ffn names against the registry, so no import back
    from toyjax.config import ModelConfig


@register_ffn("dense")
class DenseFFN(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, *, deterministic: bool = True, decode: bool = False):  # per token: decode changes nothing
        dtype = jnp.dtype(self.cfg.dtype)
        h = HookPoint(name="hook_pre")(nn.Dense(self.cfg.d_ff, dtype=dtype, name="up")(x))
        return nn.Dense(self.cfg.d_model, dtype=dtype, name="down")(HookPoint(name="hook_post")(nn.gelu(h)))


@register_ffn("none")
class NoFFN(nn.Module):
    """No feed-forward part (an attention-only decoder, e.g. for induction heads): adds zeros to the stream."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, *, deterministic: bool = True, decode: bool = False):
        return jnp.zeros_like(x)
