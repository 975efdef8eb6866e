"""The fuzzer's vocabulary of edits: word classes from the story generator, words in a prompt, and edits to them.

A class (girl and boy names, colours, objects, pets, places, play verbs, feelings, sizes, pronouns, ...) holds the
generator's words and their rare synonyms; an edit that keeps the class swaps a word for another of its class.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

from toyjax import probes as probes_lib
from toyjax.data import stories as stories_lib
from toyjax.runs import Run

OTHER_CLASSES = {"pronoun": ["she", "he", "her", "his", "him"], "speech": ["said"], "motion": ["went"]}
BASE_CLASSES = {"girl": stories_lib.GIRLS, "boy": stories_lib.BOYS, "colour": stories_lib.COLOURS,
                 "object": stories_lib.OBJECTS, "pet": stories_lib.PETS, "place": stories_lib.PLACES,
                 "play": stories_lib.PLAY, "feeling": stories_lib.FEELINGS, "size": stories_lib.SIZES,
                 **OTHER_CLASSES}
# Each class holds its words and their rare synonyms; a word belongs to the first class listing it.
WORD_CLASSES = {name: list(dict.fromkeys(w for base in words for w in [base, *stories_lib.SYNONYMS.get(base, [])]))
                for name, words in BASE_CLASSES.items()}
CLASS_OF = {}
for _name, _words in WORD_CLASSES.items():
    for _word in _words:
        CLASS_OF.setdefault(_word.lower(), _name)
NAME_CLASSES = ("girl", "boy")
# Classes whose words carry no fact a probe of the family asks about (edits must leave the right answer alone).
FACT_FREE = {
    "owner": {"size", "feeling", "play", "place", "pet", "speech", "motion"},
    "location": {"size", "feeling", "play", "colour", "object", "pet", "speech", "motion"},
    "pronoun": {"size", "feeling", "play", "colour", "object", "pet", "place", "speech", "motion"},
}
ENTITY_CLASSES = ("girl", "boy", "colour", "object", "place")  # what consistent substitution renames
WORD_RE = re.compile(r"[A-Za-z]+")


@dataclasses.dataclass(frozen=True)
class Word:
    start: int
    end: int
    text: str


@dataclasses.dataclass(frozen=True)
class Slot:
    """Something to edit: word positions changed together (one, or every occurrence of an entity) and choices."""

    positions: tuple[int, ...]
    old: str
    choices: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Edit:
    positions: tuple[int, ...]
    old: str
    new: str
    log_prob: float  # MLM log P(new) summed over the positions, each masked alone in the clean prompt
    relative: float  # log P(new) - log P(old), summed the same way


def prompt_words(text: str) -> list[Word]:
    return [Word(m.start(), m.end(), m.group(0)) for m in WORD_RE.finditer(text)]


def surface(word: str, like: str) -> str:
    """Returns `word` spelled for the text: names capitalised, else capitalised where the replaced word was."""
    if CLASS_OF.get(word.lower()) in NAME_CLASSES or like[:1].isupper():
        return word[:1].upper() + word[1:]
    return word.lower()


def apply_edits(text: str, words: list[Word], edits: Sequence[Edit]) -> str:
    """Returns text with each edit's positions replaced by its new word (in the replaced word's case)."""
    replacements = {p: e.new for e in edits for p in e.positions}
    out, cursor = [], 0
    for index in sorted(replacements):
        word = words[index]
        out += [text[cursor:word.start], surface(replacements[index], word.text)]
        cursor = word.end
    return "".join(out) + text[cursor:]


def readable_words(runs: Sequence[Run], keep_class: bool) -> list[str]:
    """Returns the replacement words every run's tokenizer has as vocabulary words (class words, or all words)."""
    if keep_class:
        pool = [w for words in WORD_CLASSES.values() for w in words]
    else:
        pool = [w for w in runs[0].tokenizer.vocab if w and WORD_RE.fullmatch(w)]
    return [w for w in dict.fromkeys(pool) if all(probes_lib.in_vocabulary(r.tokenizer, w) for r in runs)]
