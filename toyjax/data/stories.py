"""The embedded default corpus: seeded simple stories from a small world, each with its latent facts.

A story introduces two or three named characters (with genders, so pronouns must agree), objects with colours
and owners, places they go, things they do and short dialogue. Objects change hands and characters move, so
predicting "the red kite belonged to ..." needs entity tracking, and "she"/"he" needs coreference. Each story
keeps its facts (final owners, final locations, and every pronoun with its referent) for checking a model's
predictions against ground truth. Rare synonyms ("puppy" for "dog", "enormous" for "big") appear with low
probability, so a top-word tokenizer has real words to simplify.
"""

from __future__ import annotations

import dataclasses
import random

GIRLS = ["Lily", "Mia", "Anna", "Sara", "Emma", "Zoe", "Lucy", "Ella", "Rose", "Amy"]
BOYS = ["Tom", "Ben", "Max", "Sam", "Leo", "Jack", "Tim", "Joe", "Finn", "Dan"]
PETS = ["dog", "cat", "bird", "fish", "rabbit", "frog"]
OBJECTS = ["ball", "kite", "doll", "book", "hat", "box", "cup", "boat", "car", "bag", "drum", "train"]
COLOURS = ["red", "blue", "green", "yellow", "pink", "white", "black", "brown", "purple", "orange"]
PLACES = ["park", "garden", "school", "beach", "forest", "kitchen", "river", "shop", "farm", "library", "zoo", "lake"]
PLAY = ["played", "ran", "jumped", "sang", "danced", "laughed", "raced"]
FEELINGS = ["happy", "sad", "angry", "scared", "proud", "tired", "excited"]
SIZES = ["big", "small", "little", "new", "old", "shiny"]
# Rare variants: (common word, [rarer synonyms]); a variant replaces the common word with probability RARE_RATE.
SYNONYMS = {
    "dog": ["puppy", "hound"], "cat": ["kitten", "kitty"], "big": ["huge", "enormous", "giant"],
    "small": ["tiny", "wee"], "happy": ["glad", "joyful", "cheerful"], "sad": ["unhappy", "gloomy"],
    "said": ["whispered", "shouted", "replied"], "scared": ["afraid", "frightened"], "went": ["walked", "hurried"],
    "angry": ["cross", "furious"], "ball": ["balloon"], "bird": ["sparrow", "robin"], "old": ["ancient"],
    "tired": ["sleepy", "weary"], "river": ["stream", "creek"], "forest": ["woods"], "shop": ["store"],
}
RARE_RATE = 0.08


@dataclasses.dataclass
class Story:
    text: str
    facts: dict  # genders, owners ("red kite" -> name), locations (name -> place), pronouns [(sentence, word, name)]
    sentences: list[str] = dataclasses.field(default_factory=list)  # text == " ".join(sentences)


def with_article(phrase: str) -> str:
    """Returns 'a red kite' or 'an orange kite'."""
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


class _Writer:
    """Builds one story sentence by sentence while tracking who owns what, who is where, and pronouns."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.sentences: list[str] = []
        self.facts = {"genders": {}, "owners": {}, "locations": {}, "pronouns": []}

    def word(self, common: str) -> str:
        if common in SYNONYMS and self.rng.random() < RARE_RATE:
            return self.rng.choice(SYNONYMS[common])
        return common

    def pronoun(self, name: str, case: str) -> str:
        girl = self.facts["genders"][name] == "girl"
        word = {"subject": ("she", "he"), "object": ("her", "him"), "possessive": ("her", "his")}[case][0 if girl else 1]
        self.facts["pronouns"].append((len(self.sentences), word, name))
        return word

    def say(self, sentence: str) -> None:
        self.sentences.append(sentence[0].upper() + sentence[1:])

    def give(self, name: str, thing: str) -> None:
        self.facts["owners"][thing] = name

    def move(self, name: str, place: str) -> None:
        self.facts["locations"][name] = place


def _story(rng: random.Random) -> Story:
    w = _Writer(rng)
    girls, boys = rng.sample(GIRLS, 2), rng.sample(BOYS, 2)
    cast = rng.sample(girls + boys, rng.choice([2, 2, 3]))
    for name in cast:
        w.facts["genders"][name] = "girl" if name in GIRLS else "boy"
    hero, friend = cast[0], cast[1]
    colours = rng.sample(COLOURS, 3)
    objects = rng.sample(OBJECTS, 3)
    things = [f"{c} {o}" for c, o in zip(colours, objects)]
    places = rng.sample(PLACES, 3)

    opening = rng.choice(["Once upon a time, there was {size} {kind} named {hero}.",
                          "One day, {size} {kind} named {hero} woke up early.",
                          "There was a {kind} named {hero} who lived near the {place}."])
    kind = w.facts["genders"][hero]
    w.say(opening.format(size=with_article(w.word(rng.choice(SIZES))), kind=kind, hero=hero, place=w.word(places[2])))
    w.say(f"{w.pronoun(hero, 'subject')} had {with_article(things[0])}.")
    w.give(hero, things[0])
    if rng.random() < 0.5:
        pet = w.word(rng.choice(PETS))
        w.say(f"{hero} also had a {pet} that liked to {rng.choice(['sleep', 'run', 'eat', 'hide'])}.")
    w.say(f"{friend} was {w.pronoun(hero, 'possessive')} friend, and {w.pronoun(friend, 'subject')} had {with_article(things[1])}.")
    w.give(friend, things[1])

    w.say(f"One day, {hero} {w.word('went')} to the {w.word(places[0])}.")
    w.move(hero, places[0])
    w.say(f"{w.pronoun(hero, 'subject')} took {w.pronoun(hero, 'possessive')} {things[0]} and {rng.choice(PLAY)} in the sun.")
    if rng.random() < 0.7:
        w.say(f"{friend} came to the {w.word(places[0])} too.")
        w.move(friend, places[0])
    w.say(f'{friend} {w.word("said")}, "Can I play with your {things[0]}?"')
    if rng.random() < 0.6:
        w.say(f'{hero} {w.word("said")}, "Yes, you can."')
        w.say(f"{hero} gave the {things[0]} to {friend}.")
        w.give(friend, things[0])
        w.say(f"{friend} was very {w.word('happy')}, and {w.pronoun(friend, 'subject')} said thank you.")
    else:
        w.say(f'{hero} {w.word("said")}, "No, it is mine."')
        feeling = w.word(rng.choice(["sad", "angry"]))
        w.say(f"{friend} felt {feeling}, so {w.pronoun(friend, 'subject')} went home.")
        w.move(friend, "home")
    if len(cast) == 3:
        third = cast[2]
        w.say(f"Then {third} came with {with_article(things[2])}.")
        w.give(third, things[2])
        w.move(third, w.facts["locations"].get(hero, places[0]))
        if rng.random() < 0.5:
            w.say(f"{third} gave {w.pronoun(third, 'possessive')} {things[2]} to {hero}.")
            w.give(hero, things[2])
    if rng.random() < 0.6:
        w.say(f"Later, {hero} {w.word('went')} to the {w.word(places[1])} and felt {w.word(rng.choice(FEELINGS))}.")
        w.move(hero, places[1])
    owner = w.facts["owners"][things[0]]
    w.say(f"At the end of the day, the {things[0]} belonged to {owner}.")
    w.say(f"{hero} was at the {w.facts['locations'][hero]}.")
    w.say("The end.")
    return Story(" ".join(w.sentences), w.facts, list(w.sentences))


def generate_stories(n: int, seed: int = 0) -> list[Story]:
    """Returns n stories; story i depends only on (seed, i), so any prefix is stable."""
    return [_story(random.Random(f"{seed}:{i}")) for i in range(n)]


def generate_texts(n: int, seed: int = 0) -> list[str]:
    return [story.text for story in generate_stories(n, seed)]
