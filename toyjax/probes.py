"""Latent-fact probes from the embedded stories: does a model's next word agree with the story's ground truth?

Three families, each a prompt cut from a generated story, the right continuation and wrong candidates:

  owner     "... At the end of the day, the red kite belonged to" -> the final owner; wrong: the other characters
  location  "... Lily was at the"                                  -> where the hero is; wrong: the other places
            the story mentions (padded to two with other places, in a seeded order)
  pronoun   "... Tom was her friend, and" -> "he"                   -> the pronoun with its referent's gender;
            wrong: the other gender's forms (she <-> he, his/him <-> her)

A candidate's score is its log-probability as a continuation: log p(prompt + candidate) minus the log-prob of
the tokens every candidate's encoding shares (the prompt's, unless a phrase token crosses the boundary, in
which case the comparison is still of whole-text probabilities). A probe is right when the answer scores
highest; its margin is answer minus best wrong, in bits. A probe whose answer, a candidate or a needed word
(the object, the names) is not a vocabulary word of the run's tokenizer is "not expressible" for that run and
left out of its accuracy, instead of counted wrong.
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Sequence

import numpy as np

from toyjax.data import stories as stories_lib
from toyjax.evaluate import LN2, token_log_probs
from toyjax.runs import Run

FAMILIES = ("owner", "location", "pronoun")
# The generator writes "her" only as a possessive ("her friend"), never as an object, so its rival is "his".
PRONOUN_WRONG = {"she": ("he",), "he": ("she",), "his": ("her",), "him": ("her",), "her": ("his",)}
_PRONOUN_RE = re.compile(r"\b(she|he|her|his|him)\b", re.IGNORECASE)


@dataclasses.dataclass
class Probe:
    family: str
    story: int  # index of the story it was cut from
    prompt: str
    answer: str
    wrong: list[str]
    needed: list[str]  # words the probe needs in the vocabulary besides the candidates

    @property
    def candidates(self) -> list[str]:
        return [self.answer, *self.wrong]


def _owner_probe(index: int, story: stories_lib.Story) -> Probe:
    last = [s for s in story.sentences if s.startswith("At the end of the day, the ")][-1]
    thing = last.removeprefix("At the end of the day, the ").split(" belonged to ")[0]
    owner = story.facts["owners"][thing]
    cut = story.text.index(last) + len(last) - len(owner) - 1  # before "Owner."
    names = list(story.facts["genders"])
    return Probe("owner", index, story.text[:cut].rstrip(), owner, [n for n in names if n != owner], thing.split() + names)


def _location_probe(index: int, story: stories_lib.Story) -> Probe:
    hero = next(iter(story.facts["genders"]))
    place = story.facts["locations"][hero]
    sentence = f"{hero} was at the {place}."
    cut = story.text.rindex(sentence) + len(sentence) - len(place) - 1  # before "place."
    prompt = story.text[:cut].rstrip()
    mentioned = [p for p in stories_lib.PLACES if p != place and re.search(rf"\b{p}\b", prompt)]
    others = [p for p in stories_lib.PLACES if p != place and p not in mentioned]
    random.Random(f"location:{index}").shuffle(others)
    wrong = mentioned + others[: max(0, 2 - len(mentioned))]
    return Probe("location", index, prompt, place, wrong, [hero])


def _pronoun_probe(index: int, story: stories_lib.Story) -> Probe | None:
    """Returns a probe on one pronoun of the story (chosen by a seeded draw), or None if the text disagrees."""
    facts = story.facts["pronouns"]
    if not facts:
        return None
    choice = random.Random(f"pronoun:{index}").randrange(len(facts))
    sentence_index, word, name = facts[choice]
    # The k-th pronoun fact of a sentence is its k-th pronoun word (facts are recorded in writing order).
    k = sum(1 for s, _, _ in facts[:choice] if s == sentence_index)
    sentence = story.sentences[sentence_index]
    found = list(_PRONOUN_RE.finditer(sentence))
    if len(found) != sum(1 for s, _, _ in facts if s == sentence_index) or found[k].group(0).lower() != word:
        return None
    offset = len(" ".join(story.sentences[:sentence_index])) + (1 if sentence_index else 0)
    prompt = story.text[: offset + found[k].start()].rstrip()
    surface = found[k].group(0)
    shape = str.capitalize if surface[:1].isupper() else str
    return Probe("pronoun", index, prompt, shape(word), [shape(w) for w in PRONOUN_WRONG[word]], [name])


def make_probes(stories: Sequence[stories_lib.Story], n_per_family: int) -> list[Probe]:
    """Returns up to n_per_family probes of each family, one per story, in story order."""
    makers = {"owner": _owner_probe, "location": _location_probe, "pronoun": _pronoun_probe}
    out = []
    for family in FAMILIES:
        made = [p for p in (makers[family](i, s) for i, s in enumerate(stories)) if p is not None]
        out += made[:n_per_family]
    return out


# -- scoring --------------------------------------------------------------------------------------------------


def in_vocabulary(tokenizer, word: str) -> bool:
    """Returns whether every piece of `word` is a vocabulary word (not simplified, not <unk>)."""
    base = getattr(tokenizer, "base", tokenizer)
    pieces = tokenizer.pre_tokenize(word)
    return bool(pieces) and all(p in base.token_to_id for p in pieces)


def expressible(tokenizer, probe: Probe) -> bool:
    return all(in_vocabulary(tokenizer, w) for w in probe.candidates + probe.needed)


def _shared_prefix(sequences: list[list[int]]) -> int:
    n = min(len(s) for s in sequences)
    for i in range(n):
        if len({s[i] for s in sequences}) > 1:
            return i
    return n


def score_probes(run: Run, probes: Sequence[Probe], *, batch_size: int = 32, log_probs=token_log_probs) -> list[dict]:
    """Returns per probe {expressible, correct, margin_bits, scores_bits} for one run (None where inexpressible).

    log_probs: the per-token log-prob function (evaluate.token_log_probs; a reference forward can stand in).
    """
    tokenizer = run.tokenizer
    eos = tokenizer.eos_id
    texts, owners = [], []
    for index, probe in enumerate(probes):
        if expressible(tokenizer, probe):
            texts += [f"{probe.prompt} {c}" for c in probe.candidates]
            owners += [index] * len(probe.candidates)
    sequences = [[eos, *ids] for ids in tokenizer.encode_batch(texts)] if texts else []
    token_lps = log_probs(run, sequences, batch_size=batch_size) if sequences else []
    grouped: dict[int, list[tuple[list[int], np.ndarray]]] = {}
    for owner, seq, lp in zip(owners, sequences, token_lps):
        grouped.setdefault(owner, []).append((seq, lp))
    results = []
    for index, probe in enumerate(probes):
        if index not in grouped:
            results.append({"expressible": False, "correct": None, "margin_bits": None, "scores_bits": None})
            continue
        seqs = [s for s, _ in grouped[index]]
        shared = _shared_prefix(seqs)
        # log_probs[j] is the log-prob of token j + 1: the continuation starts at target index shared - 1.
        scores = np.array([lp[shared - 1:].sum() for _, lp in grouped[index]]) / LN2
        best_wrong = scores[1:].max()
        results.append({"expressible": True, "correct": bool(scores[0] > best_wrong),
                        "margin_bits": float(scores[0] - best_wrong), "scores_bits": [float(s) for s in scores]})
    return results


def summarize(probes: Sequence[Probe], results: Sequence[dict]) -> dict:
    """Returns per family: n, expressible, accuracy and mean margin (bits) over the expressible probes."""
    out = {}
    for family in FAMILIES:
        rows = [r for p, r in zip(probes, results) if p.family == family]
        scored = [r for r in rows if r["expressible"]]
        out[family] = {
            "n": len(rows), "expressible": len(scored), "not_expressible": len(rows) - len(scored),
            "accuracy": float(np.mean([r["correct"] for r in scored])) if scored else None,
            "mean_margin_bits": float(np.mean([r["margin_bits"] for r in scored])) if scored else None,
            "chance": float(np.mean([1 / len(p.candidates) for p in probes if p.family == family])) if rows else None,
        }
    return out
