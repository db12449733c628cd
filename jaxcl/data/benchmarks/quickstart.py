"""The bundled offline benchmark behind ``recipes/quickstart.yaml``.

Everything is generated from a seed by code (no downloads, no files), so every machine sees the
same data:

* **CPT domains** (plain text, scored by perplexity): ``cpt/recipes`` (cooking instructions) and
  ``cpt/starlog`` (a starship's log). Their vocabularies and templates differ, so training on one
  lowers its perplexity and training on the next raises the first one again (forgetting).
* **CIT tasks** (prompt → response, scored by exact match, prompt masked out of the loss):
  ``cit/sentiment`` (classify a short review), ``cit/capitals`` (recall invented facts),
  ``cit/antonyms`` (give the opposite word), each with its own prompt format; ``cit/arith``
  (add two digits) is a harder fourth task, left out of the quickstart.
* **CA preference set** (prompt, chosen, rejected; scored by preference accuracy):
  ``ca/politeness`` (a polite helpful reply preferred to a curt refusal).

Train and eval splits come from different seeds; the fact tasks (capitals, arith) draw both from
the same small universe of facts, as knowledge probes do.
"""

from __future__ import annotations

import random
from collections.abc import Callable

Example = dict[str, str]

_DISHES = ["bread", "soup", "pie", "stew", "cake", "curry", "risotto", "pancakes", "salad"]
_INGREDIENTS = ["flour", "butter", "onion", "garlic", "rice", "milk", "sugar", "lentils", "basil"]
_STEPS = ["stir gently", "bake", "simmer", "whisk", "fold", "chop finely", "roast", "knead"]

_SHIPS = ["Aurora", "Kestrel", "Nomad", "Halcyon", "Vesper", "Orion"]
_SECTORS = ["Taurus", "Kappa", "Cygnus", "Vega", "Lyra", "Draco"]
_EVENTS = ["shields at", "hull integrity", "warp reserve", "oxygen level", "sensor range"]

_POSITIVE = ["wonderful", "delightful", "great", "superb", "lovely", "excellent"]
_NEGATIVE = ["terrible", "awful", "boring", "dreadful", "poor", "bland"]
_SUBJECTS = ["the film", "the meal", "the book", "the hotel", "the concert", "the game"]

_COUNTRIES = [
    ("Zembla", "Ostrova"),
    ("Freedonia", "Fredville"),
    ("Latveria", "Doomstadt"),
    ("Genovia", "Pyrus"),
    ("Elbonia", "Mudgate"),
    ("Ruritania", "Strelsau"),
    ("Sokovia", "Novi Grad"),
    ("Wakanda", "Birnin"),
    ("Qumar", "Sadiq"),
    ("Markovia", "Elsbeth"),
    ("Krakozhia", "Ventris"),
    ("Borduria", "Szohod"),
]

_ANTONYMS = [
    ("hot", "cold"),
    ("up", "down"),
    ("early", "late"),
    ("open", "closed"),
    ("light", "dark"),
    ("full", "empty"),
    ("fast", "slow"),
    ("loud", "quiet"),
    ("wet", "dry"),
    ("rich", "poor"),
    ("high", "low"),
    ("soft", "hard"),
    ("young", "old"),
    ("begin", "end"),
    ("win", "lose"),
    ("push", "pull"),
]

_THINGS = ["my essay", "the dishes", "a bug", "my taxes", "the garden", "a resume", "the move"]


def _recipes(rng: random.Random) -> Example:
    dish, a, b = rng.choice(_DISHES), rng.choice(_INGREDIENTS), rng.choice(_INGREDIENTS)
    return {
        "text": f"To make {dish}, mix {rng.randint(1, 4)} cups of {a} with {b}, "
        f"{rng.choice(_STEPS)} and cook for {rng.randint(5, 60)} minutes."
    }


def _starlog(rng: random.Random) -> Example:
    return {
        "text": f"Stardate {rng.randint(1000, 9999)}.{rng.randint(0, 9)}: the {rng.choice(_SHIPS)} "
        f"entered the {rng.choice(_SECTORS)} sector; {rng.choice(_EVENTS)} "
        f"{rng.randint(10, 99)} percent."
    }


def _sentiment(rng: random.Random) -> Example:
    positive = rng.random() < 0.5
    word = rng.choice(_POSITIVE if positive else _NEGATIVE)
    return {
        "prompt": f"Review: {rng.choice(_SUBJECTS)} was {word}.\nSentiment:",
        "response": " positive" if positive else " negative",
    }


def _capitals(rng: random.Random) -> Example:
    country, capital = rng.choice(_COUNTRIES)
    return {"prompt": f"Q: capital of {country}?\nA:", "response": f" {capital}"}


def _arith(rng: random.Random) -> Example:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return {"prompt": f"{a}+{b}=", "response": str(a + b)}


def _antonyms(rng: random.Random) -> Example:
    word, opposite = rng.choice(_ANTONYMS)
    return {"prompt": f"Opposite of '{word}' ->", "response": f" {opposite}"}


def _politeness(rng: random.Random) -> Example:
    thing = rng.choice(_THINGS)
    return {
        "prompt": f"User: can you help with {thing}?\nAssistant:",
        "chosen": f" Gladly, let us sort out {thing} together.",
        "rejected": f" No. Deal with {thing} on your own.",
    }


GENERATORS: dict[str, tuple[str, Callable[[random.Random], Example]]] = {
    "cpt/recipes": ("text", _recipes),
    "cpt/starlog": ("text", _starlog),
    "cit/sentiment": ("instruction", _sentiment),
    "cit/capitals": ("instruction", _capitals),
    "cit/antonyms": ("instruction", _antonyms),
    "cit/arith": ("instruction", _arith),
    "ca/politeness": ("preference", _politeness),
}
