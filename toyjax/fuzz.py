"""LM fuzzer: BERT proposes edits of a latent-fact probe's story, a search looks for the fewest that break a model.

    python launch.py fuzz RUN [RUN ...] --bert DIR --out DIR [--budget 100 --n-probes 10 --max-edits 3 --seed 0]

Edits. A probe's prompt (a story cut before the fact asked about, toyjax.probes) is split into words. An editable
word is masked and BERT's masked LM scores replacement words, restricted to words that every target run has in
its vocabulary (every edit is readable by every decoder) and, with keep_class, to the word's class (names for
names of the same gender, colours for colours, play verbs for play verbs: WORD_CLASSES, from the story
generator's word lists plus a short list for speech and motion verbs). Plausibility of one edit: the MLM
log-probability log P(new | the clean prompt with that word masked); of a set of edits, relative to the original:
the sum over edited positions of log P(new) - log P(old), each position masked alone in the clean prompt. That is
the pseudo-log-likelihood difference of the edited text against the original restricted to the edited positions,
with the context held at the clean text: it ignores interactions between edits (the exact PLL would cost one
masked-LM pass per position per candidate text) and is additive, so sets are ranked without new BERT passes.
BERT sees MLM_CONTEXT_WORDS words either side of the mask (a local window: rows stay short and pack densely).
0 = as plausible as the original; more negative = less plausible.

Oracles (ORACLES; add one with `register_oracle`). Each says which words may be edited and into what, whether an
attack needs the clean answer right, and a distance that is <= 0 exactly when the edited probe breaks it:
  invariance    edit a word carrying no fact for the probe (FACT_FREE): the right answer must stay the model's
  substitution  rename a character / recolour an object / move a place everywhere: the right answer follows the
                renaming, and the model must follow it
  differential  any class-keeping edit: models that agreed on the clean probe must still agree
  surprisal     a fact-free edit must not raise the surprisal of the unchanged continuation (the story after the
                prompt, CONTINUATION_WORDS words) by more than `surprisal_jump_bits` bits per token

Search (`beam_search`): depth d expands each beam set by one edit at a position it does not touch yet; all
expansions are scored in one batched call (toyjax.probes.score_probes over toyjax.fuzz_scoring: each prefix
the candidate texts share goes through the decoder once, with the KV cache), most plausible first, cut to the
query budget. The most plausible breaking set at the lowest depth wins and is then minimised (its smaller
subsets are tried); else the beam keeps the `beam_width`
sets closest to breaking (greedy = width 1). Pruning: the top `candidates_per_slot` MLM words per slot, and
beam x edits evaluations per depth instead of every combination.

Queries: one query = one (edited text, target model) evaluation; an attack's budget includes its clean
evaluation (done once per probe and model, shared by the oracles). Confirmation re-scores every break from
scratch with `plain_token_log_probs` (one unpadded, unbatched forward per window, no cache) and is not charged.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from toyjax import evaluate, fuzz_scoring, probes as probes_lib
from toyjax.config import ConfigError
from toyjax.data import stories as stories_lib
from toyjax import bert as bert_lib  # the one BERT import of the fuzzer
from toyjax.data.run_data import run_grammar
from toyjax.fuzz_edits import (BASE_CLASSES, CLASS_OF, ENTITY_CLASSES, FACT_FREE, Edit, Slot, Word, apply_edits,
                               prompt_words, readable_words, surface)
from toyjax.runs import Run

CONTINUATION_WORDS = 16
# BERT sees this many words either side of the mask: short rows pack into one sequence length (one compilation).
MLM_CONTEXT_WORDS = 12
# -- oracles --------------------------------------------------------------------------------------------------


def word_slots(probe, words: list[Word], readable: list[str], classes: set[str] | None, keep_class: bool) -> list[Slot]:
    """Returns one slot per word of the given classes (None = any classed word), choices in the same class."""
    slots = []
    for index, word in enumerate(words):
        cls = CLASS_OF.get(word.text.lower())
        if cls is None or (classes is not None and cls not in classes):
            continue
        choices = [w for w in readable if w.lower() != word.text.lower() and (not keep_class or CLASS_OF.get(w.lower()) == cls)]
        if choices:
            slots.append(Slot((index,), word.text, tuple(choices)))
    return slots


def entity_slots(probe, words: list[Word], readable: list[str]) -> list[Slot]:
    """Returns one slot per entity (name, colour, object, place) of the prompt, covering all its occurrences.

    Replacements are same-class words the prompt and the probe's candidates do not use; an entity whose rare
    synonym also appears ("forest" and "woods") is skipped, as renaming one spelling would split the entity.
    """
    lowered = [w.text.lower() for w in words]
    used = set(lowered) | {c.lower() for c in probe.candidates}
    slots = []
    for cls in ENTITY_CLASSES:
        for base in BASE_CLASSES[cls]:
            key = base.lower()
            if key not in lowered or any(s in lowered for s in stories_lib.SYNONYMS.get(base, [])):
                continue
            choices = [w for w in readable if CLASS_OF.get(w.lower()) == cls and w.lower() not in used
                       and w in BASE_CLASSES[cls]]
            if choices:
                slots.append(Slot(tuple(i for i, w in enumerate(lowered) if w == key), base, tuple(choices)))
    return slots


def edited_probe(probe, words: list[Word], edits: Sequence[Edit], rename: bool) -> probes_lib.Probe:
    """Returns the probe with the edits applied to its prompt; with rename, its answers renamed along."""
    mapping = {e.old.lower(): e.new for e in edits} if rename else {}
    swap = lambda w: surface(mapping[w.lower()], w) if w.lower() in mapping else w  # noqa: E731
    return dataclasses.replace(probe, prompt=apply_edits(probe.prompt, words, edits), answer=swap(probe.answer),
                               wrong=[swap(w) for w in probe.wrong], needed=[swap(w) for w in probe.needed])


def answer_margin(scores_bits: Sequence[float], answer: int = 0) -> float:
    """Returns the score of candidate `answer` minus the best other candidate's (bits)."""
    scores = np.asarray(scores_bits, float)
    return float(scores[answer] - np.delete(scores, answer).max())


def right_answer_distance(clean: list, edited: list) -> float:
    """Returns the edited probe's answer margin (<= 0 = the model no longer answers right); one model."""
    return answer_margin(edited[0])


def agreement_distance(clean: list, edited: list) -> float:
    """Returns <= 0 when models that agreed on the clean probe now give different answers, else their margin.

    Disagreeing, the smallest margin of the clean shared answer is <= 0 (some model left it); agreeing (on it or
    on a new shared answer), the smallest margin of the shared answer is > 0.
    """
    picks = {int(np.argmax(s)) for s in edited}
    shared = int(np.argmax(clean[0])) if len(picks) > 1 else picks.pop()
    return min(answer_margin(s, shared) for s in edited)


@dataclasses.dataclass(frozen=True)
class Oracle:
    name: str
    description: str
    slots: Callable  # (probe, words, readable words, keep_class) -> list[Slot]
    measure: str  # "answer": candidate scores per model; "continuation": bits/token of the continuation
    joint: bool  # one attack over all models (True) or one per model
    rename: bool  # whether edits rename the probe's answers along (consistent substitution)
    applies: Callable  # (clean observations per model) -> whether to attack
    distance: Callable  # (clean, edited observations per model, settings) -> float, <= 0 = broken


ORACLES: dict[str, Oracle] = {}


def register_oracle(oracle: Oracle) -> Oracle:
    ORACLES[oracle.name] = oracle
    return oracle


def _fact_free(probe, words, readable, keep_class):
    return word_slots(probe, words, readable, FACT_FREE[probe.family], keep_class)


register_oracle(Oracle(
    "invariance", "an edit to a word carrying no fact for the probe leaves the model's right answer unchanged",
    _fact_free, "answer", False, False, lambda clean: answer_margin(clean[0]) > 0,
    lambda clean, edited, settings: right_answer_distance(clean, edited)))
register_oracle(Oracle(
    "substitution", "renaming a character / recolouring an object / moving a place everywhere: the model follows",
    lambda probe, words, readable, keep_class: entity_slots(probe, words, readable), "answer", False, True,
    lambda clean: answer_margin(clean[0]) > 0, lambda clean, edited, settings: right_answer_distance(clean, edited)))
register_oracle(Oracle(
    "differential", "models that agreed on the clean probe still agree after a class-keeping edit",
    lambda probe, words, readable, keep_class: word_slots(probe, words, readable, None, keep_class), "answer", True,
    False, lambda clean: len(clean) > 1 and agreement_distance(clean, clean) > 0,
    lambda clean, edited, settings: agreement_distance(clean, edited)))
register_oracle(Oracle(
    "surprisal", "a fact-free edit raises the continuation's surprisal by at most the threshold (bits/token)",
    _fact_free, "continuation", False, False, lambda clean: True,
    lambda clean, edited, settings: settings.surprisal_jump_bits - (edited[0] - clean[0])))


# -- target models --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("model",))
def _window_logits(model, params, tokens):
    return model.apply({"params": params}, tokens, deterministic=True)


def plain_token_log_probs(run: Run, sequences: Sequence[Sequence[int]], **_) -> list[np.ndarray]:
    """Returns token_log_probs' values from one unpadded, unbatched forward pass per window (no KV cache): the
    reference path. Jitted whole, one compile per window length (cheaper than compiling each op per length)."""
    if run_grammar(run.config, run.tokenizer) is not None:
        raise ConfigError("fuzz works on runs trained on stories; this run's data has a grammar (structured data)")
    length = run.config.model.max_len
    out = []
    for seq in sequences:
        seq = np.asarray(seq, np.int32)
        log_probs = np.zeros(len(seq) - 1)
        for begin, end, first in evaluate.window_plan(len(seq) - 1, length, max(length // 2, 1)):
            logits = _window_logits(run.model, run.params, jnp.asarray(seq[None, begin:end]))
            rows = np.asarray(jax.nn.log_softmax(jnp.asarray(logits[0], jnp.float32)), np.float64)
            log_probs[first:end] = rows[np.arange(end - begin), seq[begin + 1:end + 1]][first - begin:]
        out.append(log_probs)
    return out


def continuation_bits(run: Run, prompts: Sequence[str], continuations: Sequence[str],
                      log_probs=evaluate.token_log_probs) -> list[float]:
    """Returns, per prompt, the mean surprisal (bits/token) of its continuation's tokens after the prompt."""
    tokenizer = run.tokenizer
    prompt_ids = tokenizer.encode_batch(list(prompts))
    full = tokenizer.encode_batch([f"{p} {c}" for p, c in zip(prompts, continuations)])
    sequences = [[tokenizer.eos_id, *ids] for ids in full]
    lps = log_probs(run, sequences)
    # lps[j] is token j + 1's log-prob; the continuation starts at token len(prompt) + 1 (after <eos>).
    return [float(-lp[len(p):].mean() / evaluate.LN2) for p, lp in zip(prompt_ids, lps)]


def continuation_of(story: stories_lib.Story, prompt: str) -> str:
    return " ".join(story.text[len(prompt):].split()[:CONTINUATION_WORDS])


class Targets:
    """The models under test; every evaluation of a text by a model is counted as one query."""

    def __init__(self, runs: dict[str, Run], stories: Sequence[stories_lib.Story]):
        self.runs, self.stories, self.queries = runs, stories, 0

    def observe(self, oracle: Oracle, names: Sequence[str], probes: Sequence[probes_lib.Probe],
                plain: bool = False, clean_prompt: str | None = None) -> list[list]:
        """Returns, per probe, one observation per model (candidate scores in bits, or continuation bits/token).

        The continuation is the story after the clean prompt (clean_prompt, default each probe's own prompt).
        """
        log_probs = plain_token_log_probs if plain else fuzz_scoring.shared_prefix_token_log_probs
        if not plain:
            self.queries += len(probes) * len(names)
        per_model = []
        for name in names:
            run = self.runs[name]
            if oracle.measure == "answer":
                per_model.append([r["scores_bits"] for r in probes_lib.score_probes(run, probes, log_probs=log_probs)])
            else:
                continuations = [continuation_of(self.stories[p.story], clean_prompt or p.prompt) for p in probes]
                per_model.append(continuation_bits(run, [p.prompt for p in probes], continuations, log_probs))
        return [list(row) for row in zip(*per_model)]


# -- proposals and search -------------------------------------------------------------------------------------


def score_edits(bert, items: Sequence[tuple[str, list[Word], Sequence[Slot]]], candidates_per_slot: int) -> list[list[list[Edit]]]:
    """Returns, per (prompt, words, slots) item, per slot its top candidates_per_slot edits by MLM log-probability.

    One batched BERT call for every masked position of every item, over the union of the candidate words.
    """
    contexts, where = [], {}
    for item, (prompt, words, slots) in enumerate(items):
        for p in sorted({p for s in slots for p in s.positions}):
            where[item, p] = len(contexts)
            left, right = words[max(p - MLM_CONTEXT_WORDS, 0)].start, words[min(p + MLM_CONTEXT_WORDS, len(words) - 1)].end
            contexts.append(prompt[left:words[p].start] + bert_lib.MASK_TOKEN + prompt[words[p].end:right])
    if not contexts:
        return [[[] for _ in slots] for _, _, slots in items]
    vocabulary = list(dict.fromkeys(w.lower() for _, _, slots in items for s in slots for w in (s.old, *s.choices)))
    names, scores = bert_lib.candidate_log_scores(bert, contexts, vocabulary)  # [contexts, words]
    column = {w: j for j, w in enumerate(names)}
    out = []
    for item, (_, _, slots) in enumerate(items):
        per_slot = []
        for slot in slots:
            rows = [where[item, p] for p in slot.positions]
            old = float(scores[rows, column[slot.old.lower()]].sum())
            scored = sorted(((float(scores[rows, column[c.lower()]].sum()), c) for c in slot.choices),
                            key=lambda pair: (-pair[0], pair[1]))
            per_slot.append([Edit(slot.positions, slot.old, new, lp, lp - old) for lp, new in scored[:candidates_per_slot]])
        out.append(per_slot)
    return out


def beam_search(edits: Sequence[Edit], evaluate_sets: Callable, *, max_edits: int, beam_width: int, budget: int,
                cost: int = 1) -> tuple[tuple[int, ...] | None, int, dict]:
    """Returns (the breaking set of edit indices or None, queries spent, {evaluated set: distance}).

    evaluate_sets(list of index tuples) -> distances (<= 0 = broken), costing `cost` queries per set; never more
    than `budget` queries are spent (see the module doc for the search).
    """
    plausibility = lambda s: sum(edits[i].relative for i in s)  # noqa: E731
    seen: dict[tuple, float] = {}
    spent = 0

    def run(sets):
        nonlocal spent
        sets = [s for s in dict.fromkeys(sets) if s not in seen][: max(budget - spent, 0) // cost]
        if sets:
            for s, d in zip(sets, evaluate_sets(sets)):
                seen[s] = float(d)
            spent += len(sets) * cost
        return sets

    beam: list[tuple] = [()]
    for _ in range(max_edits):
        expansions = {tuple(sorted((*s, e))) for s in beam for e in range(len(edits)) if e not in s
                      and not set(edits[e].positions) & {p for i in s for p in edits[i].positions}}
        evaluated = run(sorted(expansions, key=lambda s: (-plausibility(s), s)))
        broken = [s for s in evaluated if seen[s] <= 0]
        if broken:
            return _minimise(broken[0], seen, run, plausibility), spent, seen
        if not evaluated:
            break
        beam = sorted(evaluated, key=lambda s: (seen[s], -plausibility(s), s))[:beam_width]
    return None, spent, seen


def _minimise(best: tuple, seen: dict, run: Callable, plausibility: Callable) -> tuple:
    """Returns a breaking subset of `best` none of whose evaluated smaller subsets break (most plausible first)."""
    while len(best) > 1:
        subsets = sorted(itertools.combinations(best, len(best) - 1), key=lambda s: (-plausibility(s), s))
        run(subsets)
        broken = [s for s in subsets if seen.get(s, 1.0) <= 0]
        if not broken:
            break
        best = broken[0]
    return best


# -- driver ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FuzzSettings:
    budget: int = 100  # queries per attack, the clean evaluation included
    max_edits: int = 3
    beam_width: int = 3  # 1 = greedy
    candidates_per_slot: int = 3
    keep_class: bool = True
    surprisal_jump_bits: float = 1.0
    oracles: tuple[str, ...] = ("invariance", "substitution", "differential", "surprisal")

    def __post_init__(self):
        for key in ("budget", "max_edits", "beam_width", "candidates_per_slot"):
            if getattr(self, key) < 1:
                raise ConfigError(f"fuzz: {key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        unknown = [o for o in self.oracles if o not in ORACLES]
        if unknown or not self.oracles:
            raise ConfigError(f"fuzz: unknown oracle {unknown[0] if unknown else '(none)'!r}; "
                              f"choose from {', '.join(ORACLES)}")


def held_out_stories(runs: Sequence[Run], n: int, seed: int) -> list[stories_lib.Story]:
    """Returns n stories from a generator seed none of the runs trained on (shifted by `seed`)."""
    return stories_lib.generate_stories(n, 1 + max(r.config.data.generator_seed for r in runs) + seed)


def _predictions(probe, observations) -> list[str]:
    return [probe.candidates[int(np.argmax(o))] for o in observations]


def attack(oracle: Oracle, probe, words: list[Word], edits: list[Edit], group: list[str], clean: list,
           targets: Targets, settings: FuzzSettings) -> dict:
    """Returns one attack's record: status (skipped / survived / broken), queries, and the break if any."""
    cost = len(group)
    record = {"oracle": oracle.name, "family": probe.family, "story": probe.story, "models": group,
              "edits_available": len(edits), "queries": cost, "status": "skipped"}
    if not oracle.applies(clean):
        return record
    observed: dict[tuple, list] = {}

    def evaluate_sets(sets):
        variants = [edited_probe(probe, words, [edits[i] for i in s], oracle.rename) for s in sets]
        got = targets.observe(oracle, group, variants, clean_prompt=probe.prompt)
        observed.update(zip(sets, got))
        return [oracle.distance(clean, obs, settings) for obs in got]

    best, spent, _ = beam_search(edits, evaluate_sets, max_edits=settings.max_edits, beam_width=settings.beam_width,
                                 budget=settings.budget - cost, cost=cost)
    record.update(queries=cost + spent, status="survived" if best is None else "broken")
    if best is None:
        return record
    chosen = [edits[i] for i in best]
    variant = edited_probe(probe, words, chosen, oracle.rename)
    after = observed[best]
    # From scratch: the clean and the corrupted probe through the plain reference forward (not charged).
    plain_clean, plain_after = (targets.observe(oracle, group, [p], plain=True, clean_prompt=probe.prompt)[0]
                                for p in (probe, variant))
    confirmed = bool(oracle.applies(plain_clean) and oracle.distance(plain_clean, plain_after, settings) <= 0)
    flipped = ({"before": _predictions(probe, clean), "after": _predictions(variant, after), "expected": variant.answer}
               if oracle.measure == "answer" else {"bits_before": clean[0], "bits_after": after[0]})
    record.update(n_edits=len(chosen), plausibility=sum(e.relative for e in chosen),
                  log_prob=sum(e.log_prob for e in chosen), confirmed=confirmed, clean=probe.prompt,
                  corrupted=variant.prompt, edits=[dataclasses.asdict(e) for e in chosen],
                  distance_before=oracle.distance(clean, clean, settings),
                  distance_after=oracle.distance(clean, after, settings), **flipped)
    return record


def fuzz(runs: dict[str, Run], bert, stories: Sequence[stories_lib.Story], probe_list: Sequence[probes_lib.Probe],
         settings: FuzzSettings, progress: bool = False) -> dict:
    """Returns {"attacks": one record per (probe, oracle, model or model set), "queries", "probes", ...}."""
    from tqdm import tqdm

    bert.require_mlm_head()
    names = list(runs)
    oracles = [ORACLES[name] for name in settings.oracles]
    targets = Targets(runs, stories)
    readable = readable_words(list(runs.values()), settings.keep_class)
    usable = [p for p in probe_list if all(probes_lib.expressible(r.tokenizer, p) for r in runs.values())]
    clean = {o.measure: targets.observe(o, names, usable) for o in oracles}  # once per measure, probe and model
    clean_queries = targets.queries
    words = [prompt_words(p.prompt) for p in usable]
    slots = [{o.name: o.slots(p, w, readable, settings.keep_class) for o in oracles} for p, w in zip(usable, words)]
    unique = [list(dict.fromkeys(s for group in by_oracle.values() for s in group)) for by_oracle in slots]
    scored = score_edits(bert, [(p.prompt, w, u) for p, w, u in zip(usable, words, unique)], settings.candidates_per_slot)
    attacks = []
    for index, probe in enumerate(tqdm(usable, desc="fuzz probes", disable=not progress)):
        by_slot = dict(zip(unique[index], scored[index]))
        for oracle in oracles:
            edits = [e for slot in slots[index][oracle.name] for e in by_slot[slot]]
            for group in ([names] if oracle.joint else [[n] for n in names]):
                observations = [clean[oracle.measure][index][names.index(n)] for n in group]
                attacks.append(attack(oracle, probe, words[index], edits, group, observations, targets, settings))
    return {"models": names, "settings": dataclasses.asdict(settings), "readable_words": len(readable),
            "probes": len(probe_list), "probes_expressible": len(usable), "attacks": attacks,
            "queries": {"total": targets.queries, "clean": clean_queries}}
