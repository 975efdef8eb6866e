"""Grammars over token ids: a small BNF-like text form compiled into jittable state tables.

A grammar is text like

    program := "calc" expr ";"            # the first rule is the start rule
    expr    := "let" NAME "=" expr "in" expr | atom (("+" | "-") atom)*
    atom    := NUMBER | NAME | "(" expr ")"
    NAME    := /[a-z]/                    # a regex: every vocabulary token it fully matches
    NUMBER  := /\\d+/

with "literal" or 'literal' tokens, /regex/ token classes, rule names, ( ) groups, postfix * + ?, | between
alternatives, ε (or "") for the empty sequence and # comments. It must be parseable left to right with one token
of lookahead (LL(1)), which is what makes the parse state after a prefix unique; compile_grammar says which rule and
which tokens break that. Compiled with a bounded nesting depth (`max_depth` open rules) the parser becomes a finite
automaton over token ids:

    valid[state, token]       bool   may `token` come next in `state`
    next_state[state, token]  int32  the state after it
    features[state, F]        int32  (rule, item, depth) of the innermost open rule; 0 = outside the grammar

State 0 (FREE_START) is a document start outside the grammar and state 1 (FREE_TEXT) is free text: every token is
valid there. A document enters the grammar when its first token can start the start rule (e.g. "calc"), and goes
back to state 0 after `<eos>`, which is valid only where the grammar's string may end. An invalid token leads to
FREE_TEXT (so unconstrained samples keep a state), but annotate() rejects it in data.
"""

from __future__ import annotations

import collections
import difflib
import re
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from toyjax.grammar_text import GrammarError, GrammarReader  # noqa: F401 (GrammarError is public here)

FREE_START = 0  # document start, outside the grammar: every token valid
FREE_TEXT = 1  # inside a document that is not in the grammar: every token valid until <eos>
FEATURE_NAMES = ("rule", "item", "depth")
DEFAULT_MAX_DEPTH = 8  # open rules; the structured generator (3 nesting levels) needs 8
EOS = "<eos>"
_SPECIAL = re.compile(r"<[a-z_]+>")

DEFAULT_GRAMMAR = r"""
# Arithmetic with let-bindings and conditionals (toyjax.data.structured writes documents in it).
# A document enters the grammar when its first token is "calc"; it must end right after ";".
program  := "calc" expr ";"
expr     := "let" NAME "=" expr "in" expr
          | "if" value COMPARE value "then" expr "else" expr
          | atom (OPERATOR atom)*
atom     := value | "(" expr ")"
value    := NUMBER | NAME
OPERATOR := "+" | "-" | "*"
COMPARE  := "<" | ">" | "="
NAME     := /[a-z]/
NUMBER   := /\d+/
"""


class GrammarTables(NamedTuple):
    valid: jax.Array  # [states, vocab] bool
    next_state: jax.Array  # [states, vocab] int32
    features: jax.Array  # [states, len(FEATURE_NAMES)] int32
    feature_sizes: tuple[int, ...]  # static: number of values of each feature
    start: int  # static: the state before a document's first token (FREE_START)


# feature_sizes and start stay Python values under jit (they size embeddings and loops).
jax.tree_util.register_pytree_node(
    GrammarTables,
    lambda t: ((t.valid, t.next_state, t.features), (t.feature_sizes, t.start)),
    lambda aux, arrays: GrammarTables(*arrays, *aux),
)


def load_default_grammar() -> str:
    """Returns the grammar text of the structured domain in toyjax.data.structured."""
    return DEFAULT_GRAMMAR


# ---------------------------------------------------------------- checking and compiling


class _Production(NamedTuple):
    lhs: str
    rhs: tuple  # of ("T", class set) or ("N", name)
    text: str


def _show(symbols) -> str:
    """Returns a sequence of symbols as grammar text; helper rules (groups, repetitions) print as (...)."""
    words = [f'"{v[1]}"' if k == "T" and v[0] == "lit" else f"/{v[1]}/" if k == "T" else "(...)" if "." in v else v
             for k, v in symbols]
    return " ".join(words) or "ε (nothing)"


class _Compiler:
    """LL(1) analysis of a grammar over token classes (tokens that no terminal tells apart share a class)."""

    def __init__(self, text: str, token_to_id: dict[str, int]):
        reader = GrammarReader(text)
        self.start = reader.read()
        rules, self.owner = reader.rules, reader.owner
        for name, line in reader.refs:
            if name not in rules:
                close = difflib.get_close_matches(name, [r for r in rules if "." not in r], n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise GrammarError(f"grammar line {line}: rule {name!r} is used but never defined{hint}")
        if EOS not in token_to_id:
            raise GrammarError(f"the tokenizer has no {EOS!r} token; the grammar needs it to end documents")
        self.vocab_size = max(token_to_id.values()) + 1
        # Terminals -> token id sets -> classes.
        members: dict[tuple, set[int]] = {}
        for name, alts in rules.items():
            for alt in alts:
                for kind, key in alt:
                    if kind == "T" and key not in members:
                        members[key] = self._resolve(key, token_to_id, name, reader.line[name])
        members[("eos",)] = {token_to_id[EOS]}
        signature = collections.defaultdict(list)
        for token, tid in token_to_id.items():
            signature[tuple(k for k, ids in members.items() if tid in ids)].append(tid)
        self.class_of_token = np.zeros(self.vocab_size, np.int64)
        self.class_tokens = []
        for c, (_, ids) in enumerate(sorted(signature.items(), key=lambda kv: min(kv[1]))):
            self.class_of_token[ids] = c
            self.class_tokens.append(sorted(ids))
        self.id_to_token = {tid: tok for tok, tid in token_to_id.items()}
        classes = {key: frozenset(self.class_of_token[list(ids)].tolist()) for key, ids in members.items()}
        self.eos_class = int(self.class_of_token[token_to_id[EOS]])
        # Productions; the augmented start <start> := start <eos> makes <eos> an ordinary terminal.
        self.prods = [_Production("<start>", (("N", self.start), ("T", classes[("eos",)])), f"{self.start} <eos>")]
        self.rule_prods = collections.defaultdict(list)
        for name, alts in rules.items():
            for alt in alts:
                rhs = tuple(("T", classes[v]) if k == "T" else (k, v) for k, v in alt)
                self.rule_prods[name].append(len(self.prods))
                self.prods.append(_Production(name, rhs, _show(alt)))
        self.rule_line = reader.line
        # Frames waiting for the same remaining symbols have the same future: one state for both.
        self.canon, seen = {}, {}
        for p, prod in enumerate(self.prods):
            for dot in range(len(prod.rhs) + 1):
                self.canon[(p, dot)] = seen.setdefault(prod.rhs[dot:], (p, dot))
        self._check_reachable_and_productive()
        self._first_follow()
        self._check_left_recursion()
        self._predict()

    def _resolve(self, key, token_to_id, rule, line) -> set[int]:
        tokens = [t for t in token_to_id if not _SPECIAL.fullmatch(t)]
        if key[0] == "lit":
            if key[1] not in token_to_id:
                close = difflib.get_close_matches(key[1], tokens, n=3)
                hint = f"; close tokens: {', '.join(map(repr, close))}" if close else ""
                raise GrammarError(f"grammar line {line}, rule {self.owner_name(rule)!r}: token {key[1]!r} is not in the "
                                   f"tokenizer vocabulary{hint}")
            return {token_to_id[key[1]]}
        try:
            pattern = re.compile(key[1])
        except re.error as e:
            raise GrammarError(f"grammar line {line}: bad regex /{key[1]}/: {e}") from None
        ids = {token_to_id[t] for t in tokens if pattern.fullmatch(t)}
        if not ids:
            raise GrammarError(f"grammar line {line}, rule {self.owner_name(rule)!r}: regex /{key[1]}/ matches no "
                               "token of the tokenizer vocabulary")
        return ids

    def owner_name(self, rule):
        return self.owner.get(rule, rule).split(".")[0]

    def _check_reachable_and_productive(self):
        reached, todo = {self.start}, [self.start]
        while todo:
            for p in self.rule_prods[todo.pop()]:
                for kind, v in self.prods[p].rhs:
                    if kind == "N" and v not in reached:
                        reached.add(v)
                        todo.append(v)
        for name in sorted(self.rule_prods, key=lambda n: "." in n):  # user rules before their helpers
            if name not in reached:
                raise GrammarError(f"grammar line {self.rule_line[name]}: rule {self.owner_name(name)!r} is unreachable: "
                                   f"no rule used by the start rule {self.start!r} refers to it (remove it or use it)")
        productive, changed = set(), True
        while changed:
            changed = False
            for name, ps in self.rule_prods.items():
                finishes = any(all(k == "T" or v in productive for k, v in self.prods[p].rhs) for p in ps)
                if name not in productive and finishes:
                    productive.add(name)
                    changed = True
        stuck = list(dict.fromkeys(self.owner_name(n) for n in self.rule_prods if n not in productive))
        if stuck:
            raise GrammarError(f"grammar: rule(s) {', '.join(map(repr, stuck))} never finish: every alternative needs "
                               "one of these rules again; give one of them an alternative without recursion")

    def _first_seq(self, rhs):
        """Returns (classes that can start rhs, whether rhs can be empty)."""
        first = set()
        for kind, v in rhs:
            if kind == "T":
                return first | v, False
            first |= self.first[v]
            if v not in self.nullable:
                return first, False
        return first, True

    def _first_follow(self):
        self.nullable, self.first = set(), collections.defaultdict(set)
        self.follow = collections.defaultdict(set)
        changed = True
        while changed:
            changed = False
            for p in self.prods[1:]:
                first, nullable = self._first_seq(p.rhs)
                if not first <= self.first[p.lhs] or (nullable and p.lhs not in self.nullable):
                    self.first[p.lhs] |= first
                    self.nullable |= {p.lhs} if nullable else set()
                    changed = True
        changed = True
        while changed:
            changed = False
            for p in self.prods:
                for i, (kind, v) in enumerate(p.rhs):
                    if kind != "N":
                        continue
                    first, nullable = self._first_seq(p.rhs[i + 1:])
                    new = first | (self.follow[p.lhs] if nullable else set())
                    if not new <= self.follow[v]:
                        self.follow[v] |= new
                        changed = True

    def _check_left_recursion(self):
        begins = {n: {v for p in ps for v in self._leading_rules(self.prods[p].rhs)} for n, ps in self.rule_prods.items()}
        for name in self.rule_prods:
            seen, todo = set(), list(begins[name])
            while todo:
                n = todo.pop()
                if n == name:
                    raise GrammarError(f"grammar line {self.rule_line[name]}: rule {self.owner_name(name)!r} is "
                                       "left-recursive (it can begin with itself); write the repetition with *, e.g. "
                                       "sum := atom (\"+\" atom)*")
                if n not in seen:
                    seen.add(n)
                    todo += begins[n]

    def _leading_rules(self, rhs):
        for kind, v in rhs:
            if kind == "T":
                return
            yield v
            if v not in self.nullable:
                return

    def class_names(self, classes, limit=6):
        names = sorted({self.id_to_token[t] for c in classes for t in self.class_tokens[c][:2]})
        return ", ".join(map(repr, names[:limit])) + (", ..." if len(names) > limit else "")

    def _predict(self):
        self.predict: dict[str, dict[int, int]] = {}
        for name, ps in self.rule_prods.items():
            table: dict[int, int] = {}
            for p in ps:
                first, nullable = self._first_seq(self.prods[p].rhs)
                for c in first | (self.follow[name] if nullable else set()):
                    if c in table:
                        a, b = self.prods[table[c]], self.prods[p]
                        where = "" if "." not in name else " (inside one of its groups or repetitions)"
                        raise GrammarError(
                            f"grammar line {self.rule_line[name]}: rule {self.owner_name(name)!r} is ambiguous{where}: "
                            f"with next token {self.class_names([c])} both  {a.text}  and  {b.text}  could apply; "
                            "a left-to-right parser with one token of lookahead must be able to choose")
                    table[c] = p
            self.predict[name] = table

    def step(self, stack, c, max_depth):
        """Returns the stack of open (production, dot) frames after token class c, None if c is invalid, or
        'deep' if it is valid but needs more than max_depth open rules."""
        stack = list(stack)
        while stack:
            p, dot = stack[-1]
            kind, v = self.prods[p].rhs[dot]
            if kind == "T":
                if c not in v:
                    return None
                stack[-1] = self.canon[(p, dot + 1)]
                while stack and stack[-1][1] == len(self.prods[stack[-1][0]].rhs):
                    stack.pop()
                return tuple(stack) if len(stack) - 1 <= max_depth else "deep"
            choice = self.predict[v].get(c)
            if choice is None:
                return None
            stack[-1] = self.canon[(p, dot + 1)]
            if dot + 1 == len(self.prods[p].rhs):
                stack.pop()  # tail position: the parent has nothing left to wait for
            if self.prods[choice].rhs:
                stack.append(self.canon[(choice, 0)])
        return None


def compile_grammar(text: str, token_to_id: dict[str, int], max_depth: int = DEFAULT_MAX_DEPTH, *,
                    free_text: bool = True) -> GrammarTables:
    """Returns the state tables of `text` over the tokenizer's ids, nesting limited to max_depth open rules.

    free_text=False: every document must be in the grammar (state 0 allows only tokens that start the start
    rule), e.g. for a corpus of programs only; True lets documents outside the grammar be free text (mixed corpora).
    """
    return _compile(text, token_to_id, max_depth, free_text)[0]


def _compile(text, token_to_id, max_depth, free_text):
    if max_depth < 1:
        raise GrammarError(f"max_depth must be at least 1, got {max_depth}")
    t0 = time.perf_counter()
    g = _Compiler(text, token_to_id)
    n_classes = len(g.class_tokens)
    root = ((0, 0),)
    index, order, edges = {root: 0}, [root], []  # edges: (from, class, to) with "to" a stack index or -1 (= done)
    i = 0
    while i < len(order):  # breadth-first over reachable stacks
        for c in range(n_classes):
            new = g.step(order[i], c, max_depth)
            if new is None or new == "deep":
                continue
            if new not in index:
                index[new] = len(order)
                order.append(new)
            edges.append((i, c, index[new] if new else -1))
        i += 1
    # Keep only stacks from which the document can still end (depth limits can create dead ends).
    live, incoming = set(), collections.defaultdict(list)
    for a, c, b in edges:
        incoming[b].append(a)
    todo = list(incoming[-1])
    while todo:
        s = todo.pop()
        if s not in live:
            live.add(s)
            todo += incoming[s]
    if 0 not in live:
        raise GrammarError(f"no document of the grammar fits in max_depth={max_depth}; raise max_depth")
    kept = [s for s in range(1, len(order)) if s in live]
    state_of = {s: 2 + k for k, s in enumerate(kept)}  # states 0 and 1 are FREE_START and FREE_TEXT
    state_of[-1] = FREE_START
    n_states = 2 + len(kept)
    valid = np.zeros((n_states, n_classes), bool)
    next_state = np.full((n_states, n_classes), FREE_TEXT, np.int32)
    valid[FREE_START:FREE_TEXT + 1] = True
    valid[FREE_START] = free_text  # strict (free_text=False): only the tokens that enter the grammar, set below
    next_state[FREE_START, g.eos_class] = FREE_START
    next_state[FREE_TEXT, g.eos_class] = FREE_START
    for a, c, b in edges:
        if b in state_of and (a == 0 or a in state_of):
            row = FREE_START if a == 0 else state_of[a]
            valid[row, c] = True
            next_state[row, c] = state_of[b]
    rules = ["<outside>", "<start>"] + [r for r in g.rule_prods if "." not in r]
    all_items = [(p, d) for p in range(len(g.prods)) for d in range(len(g.prods[p].rhs))]
    items = {item: k + 1 for k, item in enumerate(all_items)}
    features = np.zeros((n_states, len(FEATURE_NAMES)), np.int32)
    for s, k in state_of.items():
        if s >= 0:
            p, d = order[s][-1]
            features[k] = (rules.index(g.owner_name(g.prods[p].lhs)), items[(p, d)], len(order[s]) - 1)
    tables = GrammarTables(
        valid=jnp.asarray(valid[:, g.class_of_token]),
        next_state=jnp.asarray(next_state[:, g.class_of_token]),
        features=jnp.asarray(features),
        feature_sizes=(len(rules), len(items) + 1, max_depth + 1),
        start=FREE_START,
    )
    info = {"compile_seconds": time.perf_counter() - t0, "states": n_states, "token_classes": n_classes,
            "rules": rules}
    return tables, info


# ---------------------------------------------------------------- using the tables


def annotate(tables: GrammarTables, token_ids, vocab: list[str] | None = None) -> np.ndarray:
    """Returns the state after each token of a stream of <eos>-terminated documents ([n] int32, numpy); raises
    GrammarError naming the position (in the stream and in its document) of the first token the grammar does not
    allow there. `vocab` (id -> token) only makes the message readable."""
    valid, next_state = np.asarray(tables.valid), np.asarray(tables.next_state)
    vocab_size = valid.shape[1]
    ids = np.asarray(token_ids, np.int64).ravel()
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise GrammarError(f"token ids must lie in [0, {vocab_size}); got {ids.min()}..{ids.max()}")
    flat_valid, flat_next = valid.ravel().tolist(), next_state.ravel().tolist()
    is_eos = (next_state[FREE_TEXT] == FREE_START).tolist()  # only <eos> leaves free text
    states = np.empty(ids.size, np.int32)
    state, doc, doc_start = tables.start, 0, 0
    for i, t in enumerate(ids.tolist()):
        k = state * vocab_size + t
        if not flat_valid[k]:
            raise GrammarError(_explain(tables, valid, state, ids, i, doc, doc_start, vocab))
        state = flat_next[k]
        states[i] = state
        if is_eos[t]:
            doc, doc_start = doc + 1, i + 1
    return states


def _explain(tables, valid, state, ids, i, doc, doc_start, vocab) -> str:
    def name(t):
        return repr(vocab[t]) if vocab is not None else f"id {t}"

    allowed = np.flatnonzero(valid[state])
    shown = ", ".join(name(t) for t in allowed[:12]) + (", ..." if allowed.size > 12 else "")
    before = " ".join(vocab[t] if vocab is not None else str(t) for t in ids[max(doc_start, i - 8):i].tolist())
    message = (f"token {name(ids[i])} at position {i} (document {doc}, token {i - doc_start}) is not allowed by the "
               f"grammar after '{before}'; allowed there: {shown}")
    depth, max_depth = int(tables.features[state, 2]), tables.feature_sizes[2] - 1
    if depth >= max_depth - 2:
        message += (f". The text is nested {depth} open rules deep and the grammar was compiled with "
                    f"max_depth={max_depth}; if the text is grammatical, compile with a larger max_depth")
    return message


def constrain_logits(tables: GrammarTables, state: jax.Array, logits: jax.Array) -> jax.Array:
    """Returns logits with tokens the grammar forbids in `state` set to -inf (state [...], logits [..., vocab])."""
    return jnp.where(tables.valid[state], logits, -jnp.inf)


def advance(tables: GrammarTables, state: jax.Array, token: jax.Array) -> jax.Array:
    """Returns the grammar state after `token` (same shapes as state)."""
    return tables.next_state[state, token]


_MASKED_LOGIT = -1e9  # finite, so a padded target the grammar forbids gives a large loss, not inf * 0 = nan


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, valid_mask: jax.Array) -> jax.Array:
    """Returns per-token cross-entropy of targets under the softmax over valid tokens only ([...] float32).

    logits [..., vocab], targets [...] int, valid_mask [..., vocab] bool. Invalid logits are masked before the
    log-softmax, so the model is not penalised for what it puts there (and gets no gradient through them)."""
    logits = jnp.where(valid_mask, logits.astype(jnp.float32), _MASKED_LOGIT)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def invalid_probability(logits: jax.Array, valid_mask: jax.Array) -> jax.Array:
    """Returns the probability the full softmax puts on tokens the grammar forbids ([...] float32)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.where(valid_mask, 0.0, probs), axis=-1)
