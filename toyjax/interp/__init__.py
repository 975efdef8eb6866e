"""Mechanistic-interpretability tools for toyjax decoders: cached and hooked runs under TransformerLens's names,
logit lens, direct logit attribution and activation patching."""
