"""A small multi-task set loramix generates itself, for the offline demo (tasks a 135M model learns in minutes).

Every task is a classification with single-word labels, written as records of the generic classification
format (``{"text", "label"}``), so the demo's data go through the same loader, prompts and scoring as a
user's. The generator is deterministic in its seed, and test items never repeat a training item.
"""
from __future__ import annotations

import random
from typing import Callable

from ..errors import LoramixError


_POSITIVE = ["wonderful", "delicious", "friendly", "excellent", "lovely", "fantastic", "pleasant", "superb",
             "charming", "brilliant", "great", "perfect"]
_NEGATIVE = ["terrible", "awful", "rude", "disgusting", "horrible", "dreadful", "boring", "broken", "dirty",
             "disappointing", "bad", "poor"]
_TOPICS = [
    (["The home team", "Our striker", "The champion", "The coach", "The goalkeeper", "The runner"],
     ["won", "lost", "scored in", "trained for", "missed", "celebrated"],
     ["the final", "the match", "the league title", "the marathon", "the penalty shootout", "the derby"]),
    (["The chef", "My grandmother", "The bakery", "The new cafe", "The restaurant", "Our cook"],
     ["baked", "served", "cooked", "seasoned", "grilled", "tasted"],
     ["fresh bread", "a spicy curry", "the pasta", "a chocolate cake", "the soup", "roast chicken"]),
    (["A storm", "Heavy rain", "The heatwave", "A cold front", "Thick fog", "Strong wind"],
     ["hit", "flooded", "swept over", "covered", "froze", "battered"],
     ["the coast", "the valley", "the city", "the northern hills", "the airport", "the farmland"]),
]
_NOUNS = ["food", "service", "movie", "hotel", "room", "staff", "music", "book", "coffee", "trip", "show", "game"]


def _sentence(rng: random.Random, classes: list[tuple[list[str], list[str], list[str]]]) -> tuple[int, str]:
    """A random class and a "subject verb object." sentence drawn from that class's word lists."""
    gold = rng.randrange(len(classes))
    return gold, " ".join(rng.choice(words) for words in classes[gold]) + "."


def _topic(rng: random.Random) -> tuple[str, list[str], int]:
    gold, sentence = _sentence(rng, _TOPICS)
    return f"Headline: {sentence}\nIs this about sports, food or weather?", ["sports", "food", "weather"], gold


_LANGUAGES = [  # (subjects, verbs, objects) of simple sentences, one row per language
    (["The cat", "My brother", "The teacher", "A farmer", "Our neighbour", "The child"],
     ["eats", "sees", "likes", "buys", "finds", "wants"],
     ["the apple", "a book", "the bread", "a red car", "the old house", "some water"]),
    (["Le chat", "Mon frère", "Le professeur", "Un fermier", "Notre voisin", "L'enfant"],
     ["mange", "voit", "aime", "achète", "trouve", "veut"],
     ["la pomme", "un livre", "le pain", "une voiture rouge", "la vieille maison", "de l'eau"]),
    (["El gato", "Mi hermano", "El profesor", "Un granjero", "Nuestro vecino", "El niño"],
     ["come", "ve", "quiere", "compra", "encuentra", "busca"],
     ["la manzana", "un libro", "el pan", "un coche rojo", "la casa vieja", "el agua"]),
]


def _language(rng: random.Random) -> tuple[str, list[str], int]:
    gold, sentence = _sentence(rng, _LANGUAGES)
    return f"Sentence: {sentence}\nIs this English, French or Spanish?", ["English", "French", "Spanish"], gold


def _sentiment(rng: random.Random) -> tuple[str, list[str], int]:
    gold = rng.randrange(2)
    words = _POSITIVE if gold == 0 else _NEGATIVE
    n1, n2 = rng.sample(_NOUNS, 2)
    w1, w2 = rng.sample(words, 2)
    text = f"The {n1} was {w1} and the {n2} was {w2}."
    return f"Review: {text}\nIs this review positive or negative?", ["positive", "negative"], gold


GENERATORS: dict[str, Callable[[random.Random], tuple[str, list[str], int]]] = {
    "topic": _topic, "language": _language, "sentiment": _sentiment}


def task_labels(task: str) -> list[str]:
    """The label words of ``task``, in order (every draw of a task lists the same ones)."""
    return GENERATORS[task](random.Random(0))[1]


def synthetic_task(task: str, n: int, *, seed: int = 0, exclude: set[str] | frozenset = frozenset()) -> list[dict]:
    """``n`` distinct ``{"text", "label"}`` records of ``task``; texts in ``exclude`` are skipped."""
    if task not in GENERATORS:
        raise LoramixError(f"unknown synthetic task {task!r} (known: {', '.join(GENERATORS)})")
    rng = random.Random(f"{task}-{seed}")
    seen = set(exclude)
    out: list[dict] = []
    for _ in range(20 * n + 1000):  # enough draws for any n a task can supply
        if len(out) == n:
            break
        text, labels, gold = GENERATORS[task](rng)
        if text not in seen:
            seen.add(text)
            out.append({"text": text, "label": labels[gold]})
    if len(out) < n:
        raise LoramixError(f"synthetic task {task!r} has fewer than {n} distinct items")
    return out


def synthetic_splits(task: str, n_train: int, n_test: int, *, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Train and test records of one task; no test text appears in the training records."""
    train = synthetic_task(task, n_train, seed=seed)
    test = synthetic_task(task, n_test, seed=seed + 1, exclude={r["text"] for r in train})
    return train, test
