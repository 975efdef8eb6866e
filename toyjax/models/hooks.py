"""Named points in the forward pass where toyjax.interp reads (caches) or rewrites (hooks) an activation.

A HookPoint is a parameter-free identity module: placing one changes neither the parameters nor the numbers, so
existing checkpoints load unchanged. toyjax.interp finds them by module path (capture_intermediates to cache,
nn.intercept_methods to rewrite), so the model code exists once.
"""

from __future__ import annotations

import flax.linen as nn


class HookPoint(nn.Module):
    """x -> x. editable=False marks a value that is only read out (rewriting it would not reach the output)."""

    editable: bool = True

    def __call__(self, x):
        return x


def no_hook(name: str, x, *, editable: bool = True):
    """Returns x: the default hook of pure functions that expose internal activations (see HookPoint)."""
    return x
