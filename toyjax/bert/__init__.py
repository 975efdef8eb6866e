"""A Flax BERT that loads any Hugging Face BERT folder, scores candidate words exactly, and adapts to a corpus.

    from toyjax import bert
    enc = bert.load()                                   # packaged all-MiniLM-L6-v2: encoder only, no MLM head
    enc.hidden_states(["A cat sat on the mat."])        # [1, 128, 384]
    mlm = bert.load("runs/bert_adapt/hf")               # any BERT folder with an MLM head
    bert.candidate_distribution(mlm, "Lily saw a [MASK].", ["dog", "rainbow", "rainbows"])   # {word: p}, exact
    bert.vocabulary_distribution(mlm, "Lily saw a [MASK].", toyjax_tokenizer)                # [vocab_size]
    bert.most_probable(mlm, texts_with_mask, candidates)                                     # argmax per text

    from toyjax.bert import heads                       # heads on the frozen encoder (probing)
    from toyjax.bert import adapt                       # masked-LM adaptation: python launch.py bert-adapt

Modules, each with its own docstring:
    model.py       the flax.linen encoder + tied MLM head, `Bert` (a loaded model), `load`
    hf.py          Hugging Face config.json, tensor names (the one mapping), reading and writing folders
    candidates.py  candidate distributions by the exact chain rule over word-pieces, packed forward passes
    heads.py       features at masked words (cached) and linear / BERT heads trained on them
    adapt.py       MLM adaptation of the whole encoder, configured by toyjax.config.BertAdaptConfig

`adapt` is imported on request, not here: it pulls in the training stack (checkpoints, metrics, workdir), and
that stack reaches the tokenizers, whose contextual strategy imports this package.
"""

from toyjax.bert import heads
from toyjax.bert.candidates import (candidate_distribution, candidate_distributions, candidate_log_scores, mask_word,
                                    most_probable, vocabulary_distribution)
from toyjax.bert.hf import BertConfig, default_path
from toyjax.bert.model import MASK_TOKEN, Bert, BertModule, load, write_random_folder

__all__ = ["Bert", "BertConfig", "BertModule", "MASK_TOKEN", "candidate_distribution", "candidate_distributions",
           "candidate_log_scores", "default_path", "heads", "load", "mask_word", "most_probable",
           "vocabulary_distribution", "write_random_folder"]
