"""Mechanistic-interpretability tools for toyjax decoders: cached and hooked runs under TransformerLens's names,
logit lens, direct logit attribution and activation patching."""

from toyjax.interp.attribution import (LogitAttribution, attribution_names, direct_logit_attribution, logit_lens,
                                       logit_lens_names, residual_components, unembed, unembedding)
from toyjax.interp.hooked import HookNameError, hook_names, run_with_cache, run_with_hooks
from toyjax.interp.patching import PatchResult, logit_difference, patch_activation, plot_patching, run_patched

__all__ = ["HookNameError", "LogitAttribution", "PatchResult", "attribution_names", "direct_logit_attribution",
           "hook_names", "logit_difference", "logit_lens", "logit_lens_names", "patch_activation", "plot_patching",
           "residual_components", "run_patched", "run_with_cache", "run_with_hooks", "unembed", "unembedding"]
