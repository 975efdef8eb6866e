"""Grammar tables against a brute-force parser; constrained sampling; the valid-subset loss; clear errors."""

import functools
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from toyjax import grammar as G
from toyjax.data import structured

SPECIALS = ["<pad>", "<unk>", "<eos>"]
GRAMMAR_WORDS = "calc let in if then else = < > + - * ( ) ;".split()
STORY_WORDS = ["the", "cat", "a", "sat", "2020"]  # 'a' is a one-letter NAME, '2020' a NUMBER to the grammar
VOCAB = SPECIALS + GRAMMAR_WORDS + [str(i) for i in range(21)] + list("xyznm") + STORY_WORDS
TOKEN_TO_ID = {w: i for i, w in enumerate(VOCAB)}
EOS = TOKEN_TO_ID["<eos>"]


@functools.lru_cache(maxsize=None)
def default_tables(max_depth=G.DEFAULT_MAX_DEPTH):
    return G.compile_grammar(G.load_default_grammar(), TOKEN_TO_ID, max_depth)


def ids(words, token_to_id=TOKEN_TO_ID):
    return [token_to_id[w] for w in words]


# -- an independent reference: the same language written with precedence levels and left recursion, recognised
# by brute force over all ways to split a span (no lookahead, no automaton).

def is_number(w):
    return w.isdigit()


def is_name(w):
    return len(w) == 1 and "a" <= w <= "z"


REFERENCE = {
    "program": [["calc", "expr", ";"]],
    "expr": [["let", is_name, "=", "expr", "in", "expr"],
             ["if", "value", "cmp", "value", "then", "expr", "else", "expr"],
             ["sum"]],
    "sum": [["product"], ["sum", "addop", "product"]],
    "product": [["atom"], ["product", "*", "atom"]],
    "atom": [["value"], ["(", "expr", ")"]],
    "value": [[is_number], [is_name]],
    "addop": [["+"], ["-"]],
    "cmp": [["<"], [">"], ["="]],
}


def reference_accepts(words, rules=REFERENCE, start="program"):
    words = tuple(words)

    @functools.lru_cache(maxsize=None)
    def symbol(sym, i, j):
        if callable(sym):
            return j == i + 1 and sym(words[i])
        if sym not in rules:  # a literal token
            return j == i + 1 and words[i] == sym
        return any(sequence(tuple(alt), i, j) for alt in rules[sym])

    @functools.lru_cache(maxsize=None)
    def sequence(alt, i, j):
        if len(alt) == 1:
            return symbol(alt[0], i, j)
        # No symbol derives the empty string, so every part is non-empty and spans shrink (left recursion is fine).
        return any(symbol(alt[0], i, k) and sequence(alt[1:], k, j) for k in range(i + 1, j - len(alt) + 2))

    return bool(words) and symbol(start, 0, len(words))


def tables_accept(tables, words, token_to_id=TOKEN_TO_ID):
    """Does the automaton read words + <eos>, entering the grammar at the first word and ending outside it?"""
    valid, next_state = np.asarray(tables.valid), np.asarray(tables.next_state)
    state = tables.start
    for k, t in enumerate(ids(words, token_to_id) + [EOS]):
        if not valid[state, t]:
            return False
        state = next_state[state, t]
        if k == 0 and state in (G.FREE_START, G.FREE_TEXT):
            return False  # did not enter the grammar
    return state == G.FREE_START


def random_program(rng, budget):
    """A random derivation of the reference grammar (so also exercises left-recursive shapes)."""
    def expr(b):
        r = rng.random()
        if b > 0 and r < 0.2:
            return ["let", rng.choice(list("xyza")), "=", *expr(b - 1), "in", *expr(b - 1)]
        if b > 0 and r < 0.3:
            return ["if", value(), rng.choice(list("<>=")), value(), "then", *expr(b - 1), "else", *expr(b - 1)]
        words = atom(b)
        while rng.random() < 0.4:
            words += [rng.choice(list("+-*")), *atom(b)]
        return words

    def atom(b):
        return ["(", *expr(b - 1), ")"] if b > 0 and rng.random() < 0.25 else [value()]

    def value():
        return rng.choice(["x", "n", "a", "0", "7", "20", "2020"])

    return ["calc", *expr(budget), ";"]


def test_reference_parser_sanity():
    assert reference_accepts("calc 1 + 2 * ( x - 3 ) ;".split())
    assert reference_accepts("calc let x = 1 in if x < 2 then x else 3 ;".split())
    assert not reference_accepts("calc 1 + ;".split())
    assert not reference_accepts("calc ( 1 ;".split())


HAND_MADE = [
    ("calc 1 ;", True), ("calc x ;", True), ("calc 2020 ;", True), ("calc a * sat ;", False), ("calc a * m ;", True),
    ("calc 1 + 2 * 3 - 4 ;", True), ("calc ( ( 1 ) ) ;", True), ("calc ( ) ;", False), ("calc 1 2 ;", False),
    ("calc let x = 3 in x * x ;", True), ("calc let = 3 in x ;", False), ("calc let x = 3 x ;", False),
    ("calc if x < 3 then 1 else 2 ;", True), ("calc if ( x ) < 3 then 1 else 2 ;", False),
    ("calc if x = 3 then let y = x in y else 2 + 1 ;", True), ("calc if x < 3 then 1 ;", False),
    ("calc 1 ; ;", False), ("calc ;", False), ("calc", False), ("calc 1", False), ("calc the ;", False),
    ("calc let x = let y = 1 in y in x ;", True), ("calc - 1 ;", False), ("calc 1 + + 1 ;", False),
]


@pytest.mark.parametrize("text,expected", HAND_MADE)
def test_hand_made_cases(text, expected):
    words = text.split()
    assert reference_accepts(words) == expected
    assert tables_accept(default_tables(), words) == expected


def test_all_short_strings_match_reference():
    alphabet = ["let", "x", "=", "in", "if", "then", "else", "+", "*", "(", ")", "<", "1", ";", "cat"]
    tables = default_tables()
    checked = accepted = 0
    for n in range(4):
        for middle in itertools.product(alphabet, repeat=n):
            words = ["calc", *middle, ";"]
            expected = reference_accepts(words)
            assert tables_accept(tables, words) == expected, words
            checked, accepted = checked + 1, accepted + expected
    assert checked > 3000 and accepted > 10


def test_random_programs_and_mutations_match_reference():
    rng = np.random.default_rng(0)
    tables = default_tables(max_depth=10)
    alphabet = [w for w in VOCAB if w not in SPECIALS]
    positives = 0
    for _ in range(400):
        words = random_program(rng, budget=2)
        if len(words) > 30:
            continue
        assert reference_accepts(words) and tables_accept(tables, words), words
        positives += 1
        mutated = list(words)
        i = rng.integers(len(mutated))
        action = rng.integers(3)
        if action == 0:
            mutated[i] = rng.choice(alphabet)
        elif action == 1:
            mutated.insert(i, rng.choice(alphabet))
        elif len(mutated) > 1:
            del mutated[i]
        assert tables_accept(tables, mutated) == reference_accepts(mutated), mutated
    assert positives > 200


def test_generated_documents_tokenize_as_symbols_and_parse():
    docs = structured.generate_documents(3000, seed=1)
    assert docs == structured.generate_documents(3000, seed=1) and docs != structured.generate_documents(3000, seed=2)
    pre_tokenize = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*|\d+|[^\sA-Za-z\d]")  # the word-level tokenizer's rule
    stream = []
    for doc in docs:
        words = pre_tokenize.findall(doc)
        assert words == doc.split()
        stream += ids(words) + [EOS]
    states = G.annotate(default_tables(), stream, VOCAB)  # raises if any document needs more than the default depth
    assert states.shape == (len(stream),) and states[-1] == G.FREE_START
    for doc in docs[:200]:
        assert reference_accepts(doc.split()), doc


def test_free_text_and_switching_into_the_grammar():
    tables = default_tables()
    stream = ids("the cat sat ; ) calc".split()) + [EOS] + ids("calc 1 ;".split()) + [EOS] + ids(["the"])
    states = G.annotate(tables, stream)
    n_story = 6
    assert list(states[:n_story]) == [G.FREE_TEXT] * n_story  # 'calc' mid-document stays free text
    assert states[n_story] == G.FREE_START
    assert all(s >= 2 for s in states[n_story + 1:n_story + 4])  # the structured document is inside the grammar
    assert states[n_story + 4] == G.FREE_START and states[-1] == G.FREE_TEXT
    assert np.asarray(tables.valid)[G.FREE_START].all() and np.asarray(tables.valid)[G.FREE_TEXT].all()
    features = np.asarray(tables.features)
    assert (features[[G.FREE_START, G.FREE_TEXT]] == 0).all()
    assert features[2:, 2].max() == G.DEFAULT_MAX_DEPTH and tables.feature_sizes[2] == G.DEFAULT_MAX_DEPTH + 1
    assert (features < np.asarray(tables.feature_sizes)).all()


def test_programs_only_tables_reject_free_text():
    tables = G.compile_grammar(G.load_default_grammar(), TOKEN_TO_ID, free_text=False)
    assert np.flatnonzero(np.asarray(tables.valid)[G.FREE_START]).tolist() == [TOKEN_TO_ID["calc"]]
    G.annotate(tables, ids("calc 1 ;".split()) + [EOS])
    with pytest.raises(G.GrammarError, match=r"token 'the' at position 4 \(document 1, token 0\).*allowed there: 'calc'$"):
        G.annotate(tables, ids("calc 1 ;".split()) + [EOS] + ids(["the"]), VOCAB)


def test_ebnf_operators_against_direct_recursive_parser():
    text = """
    doc  := "calc" list+ ";"
    list := "[" (item ("," item)*)? "]"     # groups, ?, * and +
    item := NUM | list
    NUM  := /\\d+/
    """
    token_to_id = TOKEN_TO_ID | {"[": 100, "]": 101, ",": 102}
    tables = G.compile_grammar(text, token_to_id, max_depth=12)

    def parse_list(w, i):  # returns the index after a list starting at i, or -1
        if i >= len(w) or w[i] != "[":
            return -1
        i += 1
        if i < len(w) and w[i] == "]":
            return i + 1
        while True:
            i = i + 1 if i < len(w) and w[i].isdigit() else parse_list(w, i)
            if i < 0 or i >= len(w):
                return -1
            if w[i] == "]":
                return i + 1
            if w[i] != ",":
                return -1
            i += 1

    def direct(w):
        if len(w) < 3 or w[0] != "calc" or w[-1] != ";":
            return False
        i = parse_list(w, 1)
        while 0 < i < len(w) - 1:
            i = parse_list(w, i)
        return i == len(w) - 1

    accepted = 0
    for n in range(8):
        for middle in itertools.product(["[", "]", ",", "5"], repeat=n):
            words = ["calc", *middle, ";"]
            assert tables_accept(tables, words, token_to_id) == direct(words), words
            accepted += direct(words)
    assert accepted > 20


def test_constrained_sampling_with_random_logits_always_parses():
    tables = G.compile_grammar(G.load_default_grammar(), TOKEN_TO_ID, free_text=False)  # every document a program
    batch, steps = 64, 120

    @jax.jit
    def sample(key):
        def step(carry, key):
            state = carry
            logits = 3.0 * jax.random.normal(key, (batch, len(VOCAB)))
            token = jax.random.categorical(key, G.constrain_logits(tables, state, logits))
            return G.advance(tables, state, token), token

        _, tokens = jax.lax.scan(step, jnp.full((batch,), tables.start), jax.random.split(key, steps))
        return tokens.T

    tokens = np.asarray(sample(jax.random.key(0)))
    complete = 0
    for row in tokens.tolist():
        while EOS in row:
            doc, row = row[:row.index(EOS)], row[row.index(EOS) + 1:]
            assert reference_accepts([VOCAB[t] for t in doc]), [VOCAB[t] for t in doc]
            complete += 1
        G.annotate(tables, row)  # the unfinished tail is still a valid prefix
    assert complete > batch


def test_masked_cross_entropy_matches_float64_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 11)) * 4
    targets = rng.integers(0, 11, size=(3, 5))
    mask = rng.random((3, 5, 11)) < 0.4
    mask[np.arange(3)[:, None], np.arange(5)[None, :], targets] = True
    loss = G.masked_cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(targets), jnp.asarray(mask))
    expected = np.zeros((3, 5))
    for b, t in itertools.product(range(3), range(5)):
        allowed = logits[b, t][mask[b, t]]
        expected[b, t] = np.log(np.exp(allowed - allowed.max()).sum()) + allowed.max() - logits[b, t, targets[b, t]]
    np.testing.assert_allclose(np.asarray(loss), expected, rtol=1e-5, atol=1e-5)
    grad = jax.grad(lambda x: G.masked_cross_entropy(x, jnp.asarray(targets), jnp.asarray(mask)).sum())(
        jnp.asarray(logits, jnp.float32))
    assert np.all(np.asarray(grad)[~mask] == 0)  # nothing pushes on the tokens the grammar forbids
    invalid = G.invalid_probability(jnp.asarray(logits, jnp.float32), jnp.asarray(mask))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(invalid), (probs * ~mask).sum(-1), rtol=1e-5, atol=1e-6)


def test_tables_are_a_pytree_with_static_sizes():
    tables = default_tables()
    leaves = jax.tree_util.tree_leaves(tables)
    assert len(leaves) == 3 and tables.valid.dtype == jnp.bool_ and tables.next_state.dtype == jnp.int32
    sizes = jax.jit(lambda t: jnp.asarray(sum(t.feature_sizes) + t.start))(tables)
    assert int(sizes) == sum(tables.feature_sizes)


BAD_GRAMMARS = [
    ('s := "calc" a ";"\na := "x" "1" | "x" "2"', r"rule 'a' is ambiguous.*'x'"),
    ('s := "calc" a* "x" ";"\na := "x"', r"ambiguous"),
    ('s := "calc" ";"\nunused := "x"', r"rule 'unused' is unreachable"),
    ('s := "calc" b ";"', r"rule 'b' is used but never defined"),
    ('s := "calc" e ";"\ne := e "+" "1" | "1"', r"rule 'e' is left-recursive"),
    ('s := "calc" e ";"\ne := "(" e ")"', r"rule\(s\) 's', 'e' never finish"),
    ('s := "calc" "lett" ";"', r"token 'lett' is not in the tokenizer vocabulary; close tokens: 'let'"),
    ('s := "calc" /[A-Z]+/ ";"', r"regex /\[A-Z\]\+/ matches no token"),
    ('s := "calc" ( "x" ";"', r"never closed"),
    ('s := "calc" ";"\ns := "x"', r"rule 's' is defined twice"),
    ('s = "calc"', r"line 1: expected ':='|cannot read"),
]


@pytest.mark.parametrize("text,message", BAD_GRAMMARS)
def test_bad_grammars_give_clear_errors(text, message):
    with pytest.raises(G.GrammarError, match=message):
        G.compile_grammar(text, TOKEN_TO_ID)


def test_ungrammatical_data_names_the_position():
    stream = ids("calc 1 ;".split()) + [EOS] + ids("calc 1 + ) ;".split()) + [EOS]
    with pytest.raises(G.GrammarError, match=r"token '\)' at position 7 \(document 1, token 3\).*allowed there: '\('"):
        G.annotate(default_tables(), stream, VOCAB)
    with pytest.raises(G.GrammarError, match=r"token id 2 at position 2"):  # <eos> before the program ended
        G.annotate(default_tables(), ids("calc 1".split()) + [EOS])
    too_deep = "calc ( ( ( ( 1 ) ) ) ) ;".split()
    assert reference_accepts(too_deep)
    with pytest.raises(G.GrammarError, match=r"max_depth=8; if the text is grammatical, compile with a larger"):
        G.annotate(default_tables(), ids(too_deep), VOCAB)


def test_constrained_samples_from_a_trained_tiny_model_always_parse(tmp_path):
    from toyjax import load_run, train
    from toyjax.sample import sample
    from toyjax.testing import tiny_config

    config = tiny_config(data={"source": "structured", "n_stories": 300},
                         model={"max_len": 32, "grammar_state_embedding": True},
                         train={"loss": "valid_subset", "steps": 12, "n_samples": 0})
    result = train.run(config, tmp_path, quiet=True)
    assert np.isfinite(result["loss"])
    run = load_run(tmp_path)
    vocab, eos = run.tokenizer.vocab, run.tokenizer.eos_id
    tables = G.compile_grammar(G.load_default_grammar(), run.tokenizer.token_to_id, free_text=False)
    tokens = np.asarray(sample(run.model, run.params, [eos], n=24, length=32, key=jax.random.key(1), grammar=tables))
    complete = 0
    for row in tokens[:, 1:].tolist():
        while eos in row:
            doc, row = row[:row.index(eos)], row[row.index(eos) + 1:]
            assert reference_accepts([vocab[t] for t in doc]), [vocab[t] for t in doc]
            complete += 1
        G.annotate(tables, row, vocab)  # an unfinished program is still a valid prefix
    assert complete > 0
