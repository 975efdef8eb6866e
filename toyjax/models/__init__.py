"""Toy decoders and BERT, with pluggable attention and feed-forward parts."""
