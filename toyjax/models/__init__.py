"""Toy decoders with pluggable attention and feed-forward parts (the BERT encoder is in toyjax.bert)."""

# Importing the package registers the built-in kinds (see toyjax.models.registry): "dense" and "topk" attention,
# "dense", "moe" and "none" feed-forward. A kind of your own registers itself the same way when its module is imported.
from toyjax.models import attention, ffn, moe  # noqa: E402,F401
