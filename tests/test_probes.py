import hashlib
import math
import re

import numpy as np
import pytest

from toyjax import probes
from toyjax.data import stories
from toyjax.testing import bigram_run
from toyjax.tokenizers import TopWordTokenizer

CANONICAL = {rare: common for common, rares in stories.SYNONYMS.items() for rare in rares}
NAMES = set(stories.GIRLS) | set(stories.BOYS)


def test_story_texts_are_unchanged_and_sentences_rebuild_them():
    # sha256 of these texts from the generator before Story.sentences existed (commit 5d289da): corpora stay identical.
    texts = stories.generate_texts(300, 0) + stories.generate_texts(100, 7)
    assert hashlib.sha256("\n".join(texts).encode()).hexdigest() == \
        "d371bd7639385a318af791c0597552609d38cd17f497b4b2e63d87b44ce6aa44"
    for story in stories.generate_stories(50, 3):
        assert " ".join(story.sentences) == story.text


def replay(text: str) -> tuple[dict, dict]:
    """Returns (owners, locations) re-derived from a story's text alone, by replaying its events in order."""
    owners, locations = {}, {}
    hero = re.search(r"named (\w+)", text).group(1)
    for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
        words = [CANONICAL.get(w, w) for w in re.findall(r"\w+", sentence)]
        joined = " ".join(words)
        if m := re.fullmatch(r"(?:She|He) had an? (\w+ \w+)", joined):
            owners[m.group(1)] = hero
        elif m := re.search(r"^(\w+) was (?:her|his) friend and (?:she|he) had an? (\w+ \w+)$", joined):
            owners[m.group(2)] = m.group(1)
        elif m := re.search(r"gave (?:the|her|his) (\w+ \w+) to (\w+)$", joined):
            owners[m.group(1)] = m.group(2)
        elif m := re.fullmatch(r"Then (\w+) came with an? (\w+ \w+)", joined):
            owners[m.group(2)] = m.group(1)
            locations[m.group(1)] = locations.get(hero)
        elif m := re.search(r"^(?:One day |Later )?(\w+) went to the (\w+)", joined):
            locations[m.group(1)] = m.group(2)
        elif m := re.fullmatch(r"(\w+) came to the (\w+) too", joined):
            locations[m.group(1)] = m.group(2)
        elif m := re.fullmatch(r"(\w+) felt \w+ so (?:she|he) went home", joined):
            locations[m.group(1)] = "home"
    return owners, locations


def test_probe_answers_equal_the_facts_rederived_from_the_text():
    story_list = stories.generate_stories(150, 11)
    made = probes.make_probes(story_list, 150)
    counts = {f: sum(p.family == f for p in made) for f in probes.FAMILIES}
    assert counts["owner"] == counts["location"] == 150 and counts["pronoun"] >= 140
    for probe in made:
        story = story_list[probe.story]
        rest = story.text[len(probe.prompt):]
        assert story.text.startswith(probe.prompt) and re.match(rf"\s+{re.escape(probe.answer)}\b", rest)
        assert probe.answer not in probe.wrong and len(probe.wrong) >= 1
        owners, locations = replay(story.text[:len(probe.prompt)])
        cast = [n for n in dict.fromkeys(re.findall(r"\b[A-Z]\w+\b", story.text)) if n in NAMES]
        if probe.family == "owner":
            thing = re.search(r"the (\w+ \w+) belonged to$", probe.prompt).group(1)
            assert probe.answer == owners[thing] == story.facts["owners"][thing]
            assert sorted(probe.candidates) == sorted(cast)
        elif probe.family == "location":
            hero = re.search(r"(\w+) was at the$", probe.prompt).group(1)
            assert probe.answer == locations[hero]
        else:
            referent = probe.needed[0]
            assert (probe.answer.lower() in ("she", "her")) == (referent in stories.GIRLS)
            assert referent in probe.prompt  # the referent has been named before its pronoun


def fitted(vocab_size: int):
    return TopWordTokenizer.fit(stories.generate_texts(300, 0), vocab_size=vocab_size, simplify="unk")


def test_probe_scores_and_margins_follow_a_bigram_table():
    tokenizer = fitted(200)
    rng = np.random.default_rng(0)
    table = rng.normal(size=(tokenizer.vocab_size,) * 2) * 3
    run = bigram_run(tokenizer, table, max_len=32)
    made = probes.make_probes(stories.generate_stories(20, 5), 6)
    results = probes.score_probes(run, made, batch_size=8)
    log_probs = table - np.log(np.exp(table).sum(1, keepdims=True))
    for probe, result in zip(made, results):
        assert result["expressible"]
        last = tokenizer.encode(probe.prompt)[-1]
        # One-token candidates after a shared prompt: the score is the bigram log-prob of the candidate.
        expected = [log_probs[last, tokenizer.encode(c)[0]] / math.log(2) for c in probe.candidates]
        np.testing.assert_allclose(result["scores_bits"], expected, rtol=1e-4, atol=1e-4)
        assert result["margin_bits"] == pytest.approx(expected[0] - max(expected[1:]), abs=1e-3)
        assert result["correct"] == (expected[0] > max(expected[1:]))


def test_probes_a_tokenizer_cannot_express_are_reported_not_scored_wrong():
    tokenizer = fitted(60)  # too small for every name: some names are <unk>
    run = bigram_run(tokenizer, np.zeros((tokenizer.vocab_size,) * 2), max_len=32)
    made = probes.make_probes(stories.generate_stories(40, 5), 40)
    results = probes.score_probes(run, made, batch_size=16)
    in_vocab = lambda w: w.lower() in tokenizer.token_to_id  # noqa: E731
    for probe, result in zip(made, results):
        assert result["expressible"] == all(in_vocab(w) for w in probe.candidates + probe.needed)
        assert (result["correct"] is None) == (not result["expressible"])
    summary = probes.summarize(made, results)
    assert any(s["not_expressible"] > 0 for s in summary.values()) and any(s["expressible"] > 0 for s in summary.values())
    for family, s in summary.items():
        scored = [r for p, r in zip(made, results) if p.family == family and r["expressible"]]
        assert s["expressible"] == len(scored)
        if scored:  # a uniform model ties every candidate: never strictly right, but only over expressible probes
            assert s["accuracy"] == 0.0
