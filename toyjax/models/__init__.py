"""Toy decoders with pluggable attention and feed-forward parts (the BERT encoder is in toyjax.bert)."""
