"""Corpora (embedded stories, text files, optional HF datasets), token streams and batches."""
