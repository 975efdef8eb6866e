"""Masked-LM probabilities of chosen candidate words, exact for words BERT splits into several pieces.

A candidate of k word-pieces p1..pk is scored by the chain rule with k [MASK]s in place of the one mask:
log P(p1 | M M .. M) + log P(p2 | p1 M .. M) + ... + log P(pk | p1 .. pk-1 M), filled left to right. The
forward passes are shared: a row is (sentence, number of masks, filled prefix), so all single-piece candidates
of a sentence cost one pass, and two-piece candidates sharing a first piece share their first pass. Rows are
packed several to a 48-token sequence, in batches of 1, 2, 4, 8 or 16 sequences, so the jitted forward compiles a
handful of times and computes no padding.
Candidates stay distinct keys even when they share pieces; the distribution is renormalised over them.

    toyjax.bert.candidate_distribution(bert, "the [MASK] sat .", ["cat", "dog", "aardvark"])  # {word: probability}
    toyjax.bert.most_probable(bert, texts_with_mask, candidates)                              # exact argmax per text
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from tqdm import tqdm

from toyjax.bert.model import MASK_TOKEN

PACK_LENGTH = 48  # tokens per packed sequence (~3 TinyStories rows); 32-128 measured within 10 % of each other
PACK_BATCH = 16  # packed sequences per forward call


def pack_rows(lengths, capacity: int) -> list[list[int]]:
    """Returns bins of row indices, first-fit decreasing: each row once, each bin's lengths summing <= capacity."""
    lengths = np.asarray(lengths)
    if len(lengths) and lengths.max() > capacity:
        raise ValueError(f"a row of {lengths.max()} tokens does not fit a packed sequence of {capacity}")
    free = np.zeros(0, np.int64)
    bins: list[list[int]] = []
    for index in np.argsort(-lengths, kind="stable"):
        fits = np.flatnonzero(free >= lengths[index])
        if len(fits):
            free[fits[0]] -= lengths[index]
            bins[fits[0]].append(int(index))
        else:
            free = np.append(free, capacity - lengths[index])
            bins.append([int(index)])
    return bins


def split_at_mask(bert, text_with_mask: str) -> tuple[list[int], list[int]]:
    """Returns the word-piece ids left and right of the single [MASK] in the text."""
    if not isinstance(text_with_mask, str):
        raise TypeError(f"expected a text containing {MASK_TOKEN}, got {type(text_with_mask).__name__}")
    parts = text_with_mask.split(MASK_TOKEN)
    if len(parts) != 2:
        raise ValueError(f"text must contain exactly one {MASK_TOKEN} (found {len(parts) - 1}): {text_with_mask!r}")
    return bert.pieces(parts[0]), bert.pieces(parts[1])


def candidate_pieces(bert, candidates) -> dict[str, tuple[int, ...]]:
    """Returns {candidate: word-piece ids} in input order (duplicates dropped); empty input is an error."""
    if isinstance(candidates, str):
        raise TypeError("candidates must be a list of strings, not one string")
    candidates = list(dict.fromkeys(candidates))
    if not candidates:
        raise ValueError("empty candidate list: nothing to distribute probability over")
    not_text = [c for c in candidates if not isinstance(c, str)]
    if not_text:
        raise TypeError(f"candidates must be strings, got {not_text[0]!r}")
    encodings = bert.piece_tokenizer.encode_batch(candidates, add_special_tokens=False)
    pieces = {candidate: tuple(e.ids) for candidate, e in zip(candidates, encodings)}
    for candidate, ids in pieces.items():
        if not ids:
            raise ValueError(f"candidate {candidate!r} has no word-pieces (empty or whitespace?)")
    return pieces


def _packed_chunks(lengths: list[int]):
    """Yields (sequence length, up to PACK_BATCH bins of row indices), one per forward call.

    Rows up to PACK_LENGTH tokens share sequences of that length; a longer row gets one of its own (a multiple
    of 32), so one long sentence does not widen every sequence.
    """
    by_capacity = defaultdict(list)
    for index, length in enumerate(lengths):
        by_capacity[PACK_LENGTH if length <= PACK_LENGTH else -(-length // 32) * 32].append(index)
    for capacity, indices in by_capacity.items():
        bins = [[indices[i] for i in members] for members in pack_rows([lengths[i] for i in indices], capacity)]
        for start in range(0, len(bins), PACK_BATCH):
            yield capacity, bins[start: start + PACK_BATCH]


def run_rows(bert, rows: list[tuple], targets_per_row: list[list[int]], progress: bool = False) -> list[np.ndarray]:
    """Returns, per row (left ids, right ids, n_masks, filled prefix), the log-probs of its targets.

    The scored position is the first still-masked one, i.e. [CLS] + left + len(prefix). Rows are packed several
    to a sequence (segment ids keep their attention apart, positions restart per row), so short sentences
    waste no padding; the last layer and the head run only at the scored positions.
    """
    sequences, scored = [], []
    for left, right, n_masks, prefix in rows:
        sequences.append([bert.cls_id, *left, *prefix, *[bert.mask_id] * (n_masks - len(prefix)), *right, bert.sep_id])
        scored.append(1 + len(left) + len(prefix))
        if len(sequences[-1]) > bert.config.max_position_embeddings:
            raise ValueError(f"masked text is {len(sequences[-1])} word-pieces long; the model takes at most "
                             f"{bert.config.max_position_embeddings}. Shorten the text around the [MASK].")
    lengths = [len(sequence) for sequence in sequences]
    results: list = [None] * len(rows)
    bar = tqdm(total=len(rows), desc="masked LM rows", disable=not progress, leave=False)
    for capacity, chunk in _packed_chunks(lengths):
        batch = 1 << (len(chunk) - 1).bit_length()  # a power of two: few compilations
        slots = -(-max(len(b) for b in chunk) // 4) * 4
        ids = np.full((batch, capacity), bert.config.pad_token_id, np.int32)
        segments, position_ids = np.zeros((batch, capacity), np.int32), np.zeros((batch, capacity), np.int32)
        query = np.zeros((batch, slots), np.int32)
        for b, members in enumerate(chunk):
            offset = 0
            for slot, index in enumerate(members):
                end = offset + lengths[index]
                ids[b, offset:end] = sequences[index]
                segments[b, offset:end] = slot + 1
                position_ids[b, offset:end] = np.arange(lengths[index])
                query[b, slot] = offset + scored[index]
                offset = end
        log_probs = np.asarray(bert.masked_log_probs(ids, segments, query, position_ids))
        for b, members in enumerate(chunk):
            for slot, index in enumerate(members):
                results[index] = log_probs[b, slot, targets_per_row[index]]
        bar.update(sum(len(b) for b in chunk))
    bar.close()
    return results


def plan_rows(contexts: list[tuple[list[int], list[int]]], requests: list[tuple[int, tuple, int]]):
    """Returns the forward rows the chain rule needs and where each (request, piece) term reads its log-prob.

    rows: (left, right, n_masks, filled prefix), one per distinct (context, n_masks, prefix); row_targets: per
    row {piece: slot}; term_request / term_row / term_slot: one entry per (request, piece).
    """
    row_index: dict = {}
    rows, row_targets = [], []
    term_request, term_row, term_slot = [], [], []
    for request, (context, pieces, n_masks) in enumerate(requests):
        for j, piece in enumerate(pieces):
            key = (context, n_masks, pieces[:j])
            row = row_index.get(key)
            if row is None:
                row = row_index[key] = len(rows)
                rows.append((*contexts[context], n_masks, pieces[:j]))
                row_targets.append({})
            targets = row_targets[row]
            term_request.append(request)
            term_row.append(row)
            term_slot.append(targets.setdefault(piece, len(targets)))
    return rows, row_targets, term_request, term_row, term_slot


def chain_log_probs(bert, contexts: list[tuple[list[int], list[int]]], requests: list[tuple[int, tuple, int]],
                    progress: bool = False) -> np.ndarray:
    """Returns log P(pieces, filled left to right into n_masks masks) for requests (context index, pieces, n_masks).

    With n_masks == len(pieces) this is the exact candidate score; with fewer pieces than masks it is the score
    of a prefix, an upper bound on every candidate that extends it.
    """
    return _score_plan(bert, plan_rows(contexts, requests), len(requests), progress)


def grid_log_probs(bert, contexts: list[tuple[list[int], list[int]]], grid: list[tuple[tuple, int]],
                   progress: bool = False) -> np.ndarray:
    """Returns chain_log_probs of every (pieces, n_masks) in grid at every context: [contexts, grid].

    The rows are planned once for the grid and repeated per context (no per-pair Python work).
    """
    rows, row_targets, term_request, term_row, term_slot = plan_rows([([], [])], [(0, p, n) for p, n in grid])
    n = len(contexts)
    plan = ([(*contexts[t], n_masks, prefix) for t in range(n) for _, _, n_masks, prefix in rows], row_targets * n,
            (np.arange(n)[:, None] * len(grid) + np.array(term_request, np.int64)).ravel(),
            (np.arange(n)[:, None] * len(rows) + np.array(term_row, np.int64)).ravel(), np.tile(term_slot, n))
    return _score_plan(bert, plan, n * len(grid), progress).reshape(n, len(grid))


def _score_plan(bert, plan, n_requests: int, progress: bool) -> np.ndarray:
    """Runs a plan_rows plan and sums each request's log-prob terms."""
    rows, row_targets, term_request, term_row, term_slot = plan
    row_log_probs = run_rows(bert, rows, [list(t) for t in row_targets], progress)
    offsets = np.cumsum([0] + [len(t) for t in row_targets])
    flat = np.concatenate(row_log_probs).astype(np.float64)
    terms = flat[offsets[np.asarray(term_row)] + np.asarray(term_slot)]
    return np.bincount(np.asarray(term_request), weights=terms, minlength=n_requests)


def candidate_log_scores(bert, texts_with_mask: list[str], candidates, progress: bool = False) -> tuple[list[str], np.ndarray]:
    """Returns (candidates, exact log-probabilities [texts, candidates]) by the chain rule."""
    bert.require_mlm_head()
    contexts = [split_at_mask(bert, text) for text in texts_with_mask]
    pieces = candidate_pieces(bert, candidates)
    return list(pieces), grid_log_probs(bert, contexts, [(p, len(p)) for p in pieces.values()], progress)


def _normalise(log_scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(log_scores - log_scores.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def candidate_distributions(bert, texts_with_mask: list[str], candidates, progress: bool = False) -> list[dict[str, float]]:
    """Returns one {candidate: probability} per text, renormalised over the candidates."""
    names, scores = candidate_log_scores(bert, texts_with_mask, candidates, progress)
    return [dict(zip(names, row.tolist())) for row in _normalise(scores)]


def candidate_distribution(bert, text_with_mask: str, candidates) -> dict[str, float]:
    """Returns {candidate: probability} at the text's [MASK], renormalised over the candidates."""
    return candidate_distributions(bert, [text_with_mask], candidates)[0]


def most_probable(bert, texts_with_mask: list[str], candidates, progress: bool = False) -> list[str]:
    """Returns, per text, the candidate with the highest exact chain-rule probability.

    Exact but cheaper than scoring everything: a multi-piece candidate's first-piece term is an upper bound on
    its score (later terms are log-probabilities <= 0), so only candidates whose bound beats the best exact
    score found so far are scored in full.
    """
    bert.require_mlm_head()
    contexts = [split_at_mask(bert, text) for text in texts_with_mask]
    pieces = candidate_pieces(bert, candidates)
    names = list(pieces)
    bounds = grid_log_probs(bert, contexts, [(p[:1], len(p)) for p in pieces.values()], progress)
    lengths = np.array([len(p) for p in pieces.values()])
    exact = np.where(lengths == 1, bounds, -np.inf)
    best_exact = exact.max(axis=1)
    todo = [(t, c) for t in range(len(contexts)) for c in np.flatnonzero((lengths > 1) & (bounds[t] > best_exact[t]))]
    if todo:
        full = chain_log_probs(bert, contexts, [(t, pieces[names[c]], int(lengths[c])) for t, c in todo], progress)
        for (t, c), score in zip(todo, full):
            exact[t, c] = score
    return [names[i] for i in exact.argmax(axis=1)]


def vocabulary_distribution(bert, text_with_mask: str, tokenizer, exclude=("<pad>", "<unk>", "<eos>")) -> np.ndarray:
    """Returns probabilities [vocab_size] at the [MASK] over a toyjax tokenizer's vocabulary (or a word list).

    Excluded special tokens get probability 0; every other entry is scored exactly by the chain rule.
    """
    vocab = list(getattr(tokenizer, "vocab", tokenizer))
    keep = [i for i, word in enumerate(vocab) if word not in set(exclude) and word.strip()]
    names, scores = candidate_log_scores(bert, [text_with_mask], [vocab[i] for i in keep])
    by_name = dict(zip(names, _normalise(scores)[0]))
    out = np.zeros(len(vocab))
    for i in keep:
        out[i] = by_name[vocab[i]]
    return out / out.sum()


def mask_word(words: list[str], position: int) -> str:
    """Returns the words joined by spaces with words[position] replaced by [MASK] (BERT splits punctuation anyway)."""
    if not 0 <= position < len(words):
        raise IndexError(f"position {position} outside a sentence of {len(words)} words")
    return " ".join(MASK_TOKEN if i == position else word for i, word in enumerate(words))
