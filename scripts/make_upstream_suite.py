#!/usr/bin/env python3
"""Writes the embedded upstream suite's generated items (dowser_cli/configs/tasks/data/{words,opposites,reading}.jsonl)
from the word lists below and a fixed seed; tests/test_upstream_suite.py checks the shipped files are
exactly what this writes. None of the words is a colour or a shape (the downstream task's answers).

    python scripts/make_upstream_suite.py [OUT_DIR]      (default dowser_cli/configs/tasks/data)

  words      100 items: "Which of these is a/an <category>?" with 4 options (1 of the category,
             3 from other categories), scored by likelihood (chance 25 %).
  opposites  100 items: "What is the opposite of <word>?" with 4 options, by likelihood (chance 25 %).
  reading    100 items: a two-sentence passage about a person, then a question answered from it,
             answered freely (right when the answer appears in the reply; chance ~0 %).
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SEED = 0
CATEGORIES = {
    "animal": ["dog", "cat", "horse", "cow", "lion", "tiger", "elephant", "rabbit", "sheep", "monkey", "bear",
               "wolf", "mouse", "pig", "goat", "zebra", "giraffe", "fox", "deer", "camel"],
    "fruit": ["apple", "banana", "grape", "pear", "peach", "cherry", "mango", "lemon", "strawberry", "pineapple",
              "watermelon", "plum", "kiwi", "apricot", "coconut"],
    "vehicle": ["car", "bus", "train", "bicycle", "truck", "airplane", "boat", "motorcycle", "helicopter", "ship",
                "taxi", "tram", "van", "scooter"],
    "furniture": ["chair", "table", "sofa", "bed", "desk", "shelf", "wardrobe", "stool", "bench", "cabinet"],
    "clothing": ["shirt", "jacket", "hat", "sock", "shoe", "dress", "scarf", "glove", "coat", "sweater", "skirt"],
    "body part": ["hand", "foot", "nose", "ear", "eye", "knee", "elbow", "shoulder", "finger", "mouth", "leg"],
    "musical instrument": ["piano", "guitar", "violin", "drum", "flute", "trumpet", "cello", "harp", "saxophone"],
    "tool": ["hammer", "screwdriver", "wrench", "saw", "drill", "pliers", "shovel", "axe"],
    "sport": ["football", "tennis", "basketball", "golf", "swimming", "baseball", "hockey", "volleyball", "rugby"],
    "drink": ["water", "milk", "coffee", "tea", "juice", "lemonade", "soda"],
}
OPPOSITES = [("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"),
             ("light", "dark"), ("young", "old"), ("tall", "short"), ("open", "closed"), ("early", "late"),
             ("rich", "poor"), ("hard", "soft"), ("wet", "dry"), ("full", "empty"), ("loud", "quiet"),
             ("strong", "weak"), ("day", "night"), ("left", "right"), ("good", "bad"), ("high", "low"),
             ("near", "far"), ("inside", "outside"), ("top", "bottom"), ("front", "back"), ("north", "south"),
             ("east", "west"), ("true", "false"), ("alive", "dead"), ("cheap", "expensive"), ("easy", "difficult"),
             ("safe", "dangerous"), ("sweet", "sour"), ("awake", "asleep"), ("first", "last"), ("above", "below"),
             ("win", "lose"), ("buy", "sell"), ("push", "pull"), ("clean", "dirty"), ("thick", "thin"),
             ("wide", "narrow"), ("laugh", "cry"), ("remember", "forget"), ("arrive", "leave"), ("friend", "enemy"),
             ("summer", "winter"), ("love", "hate"), ("give", "take"), ("begin", "end"), ("question", "answer")]
NAMES = ["Anna", "Tom", "Maria", "James", "Sofia", "David", "Emma", "Lucas", "Olivia", "Daniel", "Laura", "Peter",
         "Nina", "Oscar", "Julia", "Victor", "Clara", "Henry", "Alice", "Samuel"]
PETS = ["dog", "cat", "rabbit", "parrot", "hamster", "turtle"]
PET_NAMES = ["Max", "Bella", "Charlie", "Luna", "Rocky", "Daisy", "Milo", "Coco", "Buddy", "Rosie"]
CITIES = ["London", "Paris", "Madrid", "Rome", "Berlin", "Tokyo", "Sydney", "Toronto", "Cairo", "Dublin"]
JOBS = ["teacher", "doctor", "baker", "pilot", "farmer", "nurse", "lawyer", "chef", "dentist", "engineer"]


def words(rng: random.Random) -> list[dict]:
    cats = list(CATEGORIES)
    out = []
    for i in range(100):
        cat = cats[i % len(cats)]
        right = rng.choice(CATEGORIES[cat])
        others = rng.sample([c for c in cats if c != cat], 3)
        opts = [right] + [rng.choice(CATEGORIES[c]) for c in others]
        rng.shuffle(opts)
        article = "an" if cat[0] in "aeiou" else "a"
        out.append({"question_id": f"words-{i:03d}", "text": f"Which of these is {article} {cat}?",
                    "answer": right, "options": opts})
    return out


def opposites(rng: random.Random) -> list[dict]:
    out = []
    pairs = OPPOSITES + [(b, a) for a, b in OPPOSITES]   # both directions: 100 items
    for i, (word, right) in enumerate(pairs):
        pool = sorted({w for p in OPPOSITES for w in p} - {word, right})
        opts = [right] + rng.sample(pool, 3)
        rng.shuffle(opts)
        out.append({"question_id": f"opposites-{i:03d}", "text": f"What is the opposite of \"{word}\"?",
                    "answer": right, "options": opts})
    return out


def reading(rng: random.Random) -> list[dict]:
    out = []
    asks = [("pet_name", "What is the name of {name}'s {pet}?"), ("city", "In which city does {name} live?"),
            ("job", "What is {name}'s job?"), ("pet", "What kind of pet does {name} have?")]
    for i in range(100):
        f = {"name": rng.choice(NAMES), "pet": rng.choice(PETS), "pet_name": rng.choice(PET_NAMES),
             "city": rng.choice(CITIES), "job": rng.choice(JOBS)}
        passage = (f"{f['name']} works as a {f['job']} in {f['city']}. "
                   f"{f['name']} has a {f['pet']} called {f['pet_name']}.")
        key, q = asks[i % len(asks)]
        out.append({"question_id": f"reading-{i:03d}", "text": f"{passage}\n{q.format(**f)}", "answer": f[key]})
    return out


def write(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, make in (("words", words), ("opposites", opposites), ("reading", reading)):
        rows = make(random.Random(f"{SEED}:{name}"))
        p = out / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(p)
    return paths


if __name__ == "__main__":
    for p in write(Path(sys.argv[1] if len(sys.argv) > 1 else "dowser_cli/configs/tasks/data")):
        print(p)
