"""From a fuzzer break to the activations that carry it: align the (clean, corrupted) prompts token by token, pick
a logit difference that is the probe's own score margin, patch, and summarise the patching into top layers,
positions and heads.

The metric of a break and a model: logit(the model's clean pick) - logit(its corrupted pick) at the last prompt
position, each pick's first token. For candidates of one token that follow the prompt's tokens unchanged, this is
exactly the probe's score margin between the two candidates (toyjax.probes.score_probes: a log-prob difference
of one token at one position, where the log-softmax normaliser cancels); `PairMetric.equals_probe_margin` says
whether that holds. Only answer oracles whose candidates keep their names have such a pair: a substitution break
renames the answers (the clean and corrupted right answers are different tokens) and a surprisal break has no
answer, so both are skipped with that reason.

The model input is the window that scores the answer in the fuzzer (toyjax.evaluate's sliding windows): the last
model.max_len tokens of <eos> + prompt when the prompt is longer.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from toyjax.evaluate import window_plan
from toyjax.interp.patching import PatchResult, logit_difference, patch_activation
from toyjax.interp.report import token_labels

# What is patched, by report name: (activation after "blocks.{i}.", index kind of patch_activation).
PATCHES = {"resid_pre": ("hook_resid_pre", "position"), "attn_out": ("hook_attn_out", "position"),
           "mlp_out": ("hook_mlp_out", "position"), "heads": ("attn.hook_z", "head")}
SKIPPED_ORACLES = {
    "substitution": "a substitution break renames the answers, so the clean and corrupted right answers are different "
                    "tokens and no one logit difference spans both runs",
    "surprisal": "a surprisal break has no answer token (its measure is the continuation's bits/token, and "
                 "breaks.json does not record the continuation)",
}


@dataclasses.dataclass(frozen=True)
class AlignedPair:
    clean: np.ndarray  # [1, n] token ids of the clean window
    corrupted: np.ndarray  # [1, n] token ids of the corrupted window
    window_start: int  # index of the window's first token in <eos> + prompt
    edited: tuple[int, ...]  # window positions whose tokens differ
    labels: tuple[str, ...]  # clean token per window position
    corrupted_labels: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class PairMetric:
    answer: str  # the model's clean pick
    wrong: str  # its corrupted pick
    answer_id: int
    wrong_id: int
    equals_probe_margin: bool  # both picks are one token that follows each prompt's tokens unchanged


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Returns <eos> + the prompt's tokens, as the fuzzer's scoring sees them."""
    return [tokenizer.eos_id, *tokenizer.encode(prompt)]


def answer_window_start(n_tokens: int, max_len: int) -> int:
    """Returns where the input window that scores the token after n_tokens tokens starts (evaluate's windows)."""
    return window_plan(n_tokens, max_len, max(max_len // 2, 1))[-1][0]


def align_pair(tokenizer, clean: str, corrupted: str, max_len: int) -> AlignedPair | str:
    """Returns the aligned token windows of a (clean, corrupted) prompt pair, or why they cannot be paired."""
    clean_ids, corrupted_ids = prompt_ids(tokenizer, clean), prompt_ids(tokenizer, corrupted)
    if len(clean_ids) != len(corrupted_ids):
        # An edit that changes the token count shifts every later position; patching pairs positions, and a
        # shifted pairing would compare different words, so such a break is not patched.
        return (f"the clean prompt is {len(clean_ids)} tokens and the corrupted one {len(corrupted_ids)}: the edit "
                "changed the token count, so positions do not pair")
    start = answer_window_start(len(clean_ids), max_len)
    clean_w, corrupted_w = np.asarray(clean_ids[start:]), np.asarray(corrupted_ids[start:])
    edited = tuple(int(i) for i in np.flatnonzero(clean_w != corrupted_w))
    if not edited:
        return "the clean and corrupted windows are the same tokens (the edit lies outside the model's window)"
    return AlignedPair(clean_w[None].astype(np.int32), corrupted_w[None].astype(np.int32), start, edited,
                       tuple(token_labels(tokenizer, clean_w)), tuple(token_labels(tokenizer, corrupted_w)))


def picks(record: dict, model: str) -> tuple[str, str] | str:
    """Returns (clean pick, corrupted pick) of one model in a fuzzer break record, or why there is none."""
    if record.get("oracle") in SKIPPED_ORACLES:
        return SKIPPED_ORACLES[record["oracle"]]
    if "before" not in record:
        return "the break records no answers before and after"
    index = record["models"].index(model)
    before, after = record["before"][index], record["after"][index]
    if before == after:
        return f"this model's pick did not change ({before!r}); another model of the set flipped"
    return before, after


def first_token(tokenizer, prompt: str, word: str) -> tuple[int, bool]:
    """Returns (the first token of word after prompt, whether word is exactly that one token after the prompt's)."""
    ids, alone = tokenizer.encode(f"{prompt} {word}"), tokenizer.encode(prompt)
    follows = ids[:len(alone)] == alone and len(ids) > len(alone)
    return int(ids[len(alone)] if follows else tokenizer.encode(word)[0]), follows and len(ids) == len(alone) + 1


def pair_metric(tokenizer, clean: str, corrupted: str, answer: str, wrong: str) -> PairMetric | str:
    """Returns the logit-difference metric of a model's (clean pick, corrupted pick), or why it is degenerate."""
    answer_id, answer_exact = first_token(tokenizer, clean, answer)
    wrong_id, wrong_exact = first_token(tokenizer, clean, wrong)
    exact = answer_exact and wrong_exact and all(first_token(tokenizer, corrupted, w)[1] for w in (answer, wrong))
    if answer_id == wrong_id:
        return f"{answer!r} and {wrong!r} start with the same token, so their first-token logit difference is 0"
    return PairMetric(answer, wrong, answer_id, wrong_id, exact)


def make_patcher(model, activation: str, index: str):
    """Returns jitted (params, clean, corrupted, answer_id, wrong_id) -> PatchResult of the logit difference at the
    last position: one compilation per model and token length, not one per break."""
    def patch(params, clean, corrupted, answer_id, wrong_id):
        return patch_activation((model, params), clean, corrupted, logit_difference(answer_id, wrong_id), activation,
                                index=index)

    return jax.jit(patch)


def top_cells(recovered: np.ndarray, k: int) -> list[tuple[int, int, float]]:
    """Returns the k (row, column, value) cells of a [rows, cols] array with the largest recovered fraction."""
    order = np.argsort(-recovered, axis=None, kind="stable")[:k]
    return [(int(r), int(c), float(recovered[r, c])) for r, c in zip(*np.unravel_index(order, recovered.shape))]


def summarize_positions(result: PatchResult, labels: Sequence[str], edited: Sequence[int], k: int = 3) -> dict:
    """Returns the top layers, positions (with their tokens) and (layer, position) cells of a [layer, pos] patching,
    and how much the edited positions carry: their best recovered fraction against the best elsewhere."""
    recovered = np.asarray(result.recovered, np.float64)
    by_layer, by_position = recovered.max(axis=1), recovered.max(axis=0)
    others = np.setdiff1d(np.arange(recovered.shape[1]), edited)
    cells = top_cells(recovered, k)
    return {
        "top_cells": [{"layer": l, "position": p, "token": labels[p], "edited": p in edited, "recovered": v}
                      for l, p, v in cells],
        "top_layers": top_layers(by_layer, k),
        "top_positions": [{"position": int(p), "token": labels[p], "edited": int(p) in edited,
                           "recovered": float(by_position[p])} for p in np.argsort(-by_position, kind="stable")[:k]],
        "edited_best": float(recovered[:, list(edited)].max()),
        "elsewhere_best": float(recovered[:, others].max()) if len(others) else None,
    }


def summarize_heads(result: PatchResult, k: int = 3) -> dict:
    """Returns the top (layer, head) cells and the top layers of a [layer, head] patching."""
    recovered = np.asarray(result.recovered, np.float64)
    by_layer = recovered.max(axis=1)
    return {"top_heads": [{"layer": l, "head": h, "recovered": v} for l, h, v in top_cells(recovered, k)],
            "top_layers": top_layers(by_layer, k)}


def top_layers(by_layer: np.ndarray, k: int) -> list[dict]:
    """Returns the k layers with the highest recovered fraction (ties: the lower layer), best first."""
    return [{"layer": int(i), "recovered": float(by_layer[i])} for i in np.argsort(-by_layer, kind="stable")[:k]]


def aggregate(explanations: Sequence[dict], k: int = 3) -> dict:
    """Returns per model, over its explained breaks: per layer and per head the mean recovered fraction and how
    often it is among a break's top k (layers: by attention and MLP output; heads: by z)."""
    out = {}
    for model in dict.fromkeys(e["model"] for e in explanations if e["status"] == "explained"):
        mine = [e for e in explanations if e["model"] == model and e["status"] == "explained"]
        parts = {}
        for name in ("attn_out", "mlp_out", "heads"):
            arrays = [np.asarray(e["patching"][name]["recovered"]) for e in mine if name in e["patching"]]
            if not arrays:
                continue
            per_break = [a if name == "heads" else a.max(axis=1, keepdims=True) for a in arrays]  # [layer, head or 1]
            counts = np.zeros(per_break[0].shape, int)
            for a in per_break:
                for r, c, _ in top_cells(a, k):
                    counts[r, c] += 1
            mean = np.mean(per_break, axis=0)
            parts[name] = [{"layer": r, **({"head": c} if name == "heads" else {}), "mean_recovered": float(mean[r, c]),
                            "times_in_top": int(counts[r, c])}
                           for r, c in sorted(np.ndindex(mean.shape), key=lambda rc: (-counts[rc], -mean[rc]))]
        out[model] = {"explained": len(mine), **parts}
    return out
