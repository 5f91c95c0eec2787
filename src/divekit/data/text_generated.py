"""Generated offline tasks, one per fine-tuning head, so every head trains with no download.

* ``sentiment-gen`` (classify) — product reviews from templates, positive or negative; a
  negation (``not``, ``never``) flips the adjective's polarity. Chance: 50%.
* ``nli-gen`` (pair) — a premise *A doctor is cooking in the kitchen* and a hypothesis that
  follows from it, contradicts it (another activity or place, or *nobody*) or adds an
  unstated detail. Chance: 33%.
* ``ner-gen`` (tag) — sentences about people, places and organisations drawn from lists, some
  of several words (*New York*, *Acme Holdings*), tagged in IOB2.
* ``qa-gen`` (qa) — passages describing three people (city, employer, job, year); each
  question asks one fact of one person, so the span must be found in the right sentence.

Each draws from ``random.Random(seed)``; the held-out split comes from another seed.
"""

from __future__ import annotations

import random
from typing import Any

from divekit.data.registry import register_dataset
from divekit.data.text_tasks import (
    KIND_OF_REAL,
    REAL,
    QAExample,
    TaggedSentence,
    TextExample,
    TextTaskData,
    tag_labels,
)

FIRST = ["Alice", "Bruno", "Chen", "Dana", "Emil", "Fatima", "Gustav", "Hana", "Ivan", "Julia",
         "Kofi", "Lena", "Marco", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq"]
LAST = ["Smith", "Okafor", "Novak", "Tanaka", "Garcia", "Muller", "Rossi", "Kim", "Silva", "Haddad"]
PLACES = ["Paris", "Lagos", "Osaka", "Lima", "Oslo", "New York", "Cape Town", "Buenos Aires",
          "Hanoi", "Toronto", "San Diego", "Kyiv"]
ORGS = ["Acme Holdings", "Globex", "Initech", "the Red Cross", "Umbrella Labs", "Vandelay Industries",
        "the World Bank", "Stark Motors", "Wayne Foods", "Hooli"]
JOBS = ["doctor", "teacher", "pilot", "chef", "lawyer", "farmer", "engineer", "painter"]
ACTS = ["cooking", "reading", "running", "singing", "painting", "swimming", "sleeping", "writing"]
ROOMS = ["kitchen", "park", "library", "garden", "office", "station"]
PRODUCTS = ["phone", "blender", "jacket", "laptop", "kettle", "bike", "camera", "chair", "lamp"]
GOOD = ["great", "excellent", "reliable", "sturdy", "wonderful", "comfortable", "fast"]
BAD = ["awful", "flimsy", "terrible", "slow", "broken", "useless", "noisy"]


def _split(make: Any, n_train: int, n_valid: int, seed: int) -> tuple[list[Any], list[Any]]:
    train_rng, valid_rng = random.Random(seed), random.Random(seed + 10_007)
    return [make(train_rng) for _ in range(n_train)], [make(valid_rng) for _ in range(n_valid)]


# ----------------------------------------------------------------------------- classify
def _review(rng: random.Random) -> TextExample:
    positive = rng.random() < 0.5
    negated = rng.random() < 0.3
    adjective = rng.choice(GOOD if positive != negated else BAD)
    neg = rng.choice(["not", "never"]) + " " if negated else ""
    product = rng.choice(PRODUCTS)
    text = rng.choice([
        f"This {product} is {neg}{adjective}.",
        f"I bought the {product} last week and it is {neg}{adjective}.",
        f"My new {product} was {neg}{adjective}, as my friend said.",
        f"Honestly the {product} is {neg}{adjective} for the price.",
    ])
    return TextExample(text, "positive" if positive else "negative")


def sentiment_gen(seed: int = 0, n_train: int = 2000, n_valid: int = 400, **_: Any) -> TextTaskData:
    """Generated product reviews, positive or negative (negations flip the polarity)."""
    train, valid = _split(_review, n_train, n_valid, seed)
    return TextTaskData("classify", train, valid, ["negative", "positive"])


# ----------------------------------------------------------------------------- pair
def _nli(rng: random.Random) -> TextExample:
    job, act, room = rng.choice(JOBS), rng.choice(ACTS), rng.choice(ROOMS)
    premise = f"A {job} is {act} in the {room}."
    label = rng.choice(["entailment", "contradiction", "neutral"])
    if label == "entailment":
        hyp = rng.choice([f"A person is {act}.", f"Someone is in the {room}.",
                          f"A {job} is {act}.", f"There is a {job} in the {room}."])
    elif label == "contradiction":
        other = rng.choice([a for a in ACTS if a != act])
        place = rng.choice([r for r in ROOMS if r != room])
        hyp = rng.choice([f"A {job} is {other} in the {room}.", f"Nobody is {act}.",
                          f"The {job} is in the {place}.", f"No {job} is in the {room}."])
    else:
        hyp = rng.choice([f"A {job} is {act} for a friend.", f"The {job} is happy.",
                          f"A {job} is {act} before lunch.", f"The {room} is very old."])
    return TextExample(premise, label, hyp)


def nli_gen(seed: int = 0, n_train: int = 3000, n_valid: int = 600, **_: Any) -> TextTaskData:
    """Generated premise/hypothesis pairs: entailment, contradiction or neutral."""
    train, valid = _split(_nli, n_train, n_valid, seed)
    return TextTaskData("pair", train, valid, ["contradiction", "entailment", "neutral"])


# ----------------------------------------------------------------------------- tag
def _entity(words: str, kind: str) -> list[tuple[str, str]]:
    parts = words.split()
    return [(w, ("B-" if i == 0 else "I-") + kind) for i, w in enumerate(parts)]


def _tagged(rng: random.Random) -> TaggedSentence:
    person = f"{rng.choice(FIRST)} {rng.choice(LAST)}" if rng.random() < 0.6 else rng.choice(FIRST)
    place, org, job = rng.choice(PLACES), rng.choice(ORGS), rng.choice(JOBS)
    org_words = org.removeprefix("the ")
    lead = [("the", "O")] if org.startswith("the ") else []
    templates = [
        [*_entity(person, "PER"), ("works", "O"), ("for", "O"), *lead, *_entity(org_words, "ORG"),
         ("in", "O"), *_entity(place, "LOC"), (".", "O")],
        [("Yesterday", "O"), *_entity(person, "PER"), ("flew", "O"), ("to", "O"),
         *_entity(place, "LOC"), (".", "O")],
        [*lead, *_entity(org_words, "ORG"), ("hired", "O"), ("a", "O"), (job, "O"), ("named", "O"),
         *_entity(person, "PER"), (".", "O")],
        [("The", "O"), (job, "O"), ("from", "O"), *_entity(place, "LOC"), ("met", "O"),
         *_entity(person, "PER"), ("at", "O"), *lead, *_entity(org_words, "ORG"), (".", "O")],
    ]
    pairs = rng.choice(templates)
    return TaggedSentence([w for w, _ in pairs], [t for _, t in pairs])


def ner_gen(seed: int = 0, n_train: int = 1500, n_valid: int = 300, **_: Any) -> TextTaskData:
    """Generated sentences with people, places and organisations, tagged in IOB2."""
    train, valid = _split(_tagged, n_train, n_valid, seed)
    return TextTaskData("tag", train, valid, tag_labels(train + valid), {"scheme": "iob2"})


# ----------------------------------------------------------------------------- qa
def _passage(rng: random.Random, index: list[int]) -> list[QAExample]:
    people = rng.sample(FIRST, 3)
    facts = []
    context = ""
    for name in people:
        city, org, job, year = rng.choice(PLACES), rng.choice(ORGS), rng.choice(JOBS), rng.randint(1950, 2005)
        sentence = f"{name} was born in {city} in {year} and works as a {job} at {org}. "
        base = len(context)
        context += sentence
        facts.append((name, base, sentence, {"city": city, "year": str(year), "job": job, "org": org}))
    out = []
    for name, base, sentence, values in facts:
        kind = rng.choice(["city", "year", "job", "org"])
        question = {"city": f"Where was {name} born?", "year": f"In which year was {name} born?",
                    "job": f"What does {name} work as?", "org": f"Where does {name} work?"}[kind]
        answer = values[kind]
        start = base + sentence.index(answer if kind != "year" else f"in {answer}") + (
            3 if kind == "year" else 0)
        index[0] += 1
        out.append(QAExample(f"gen-{index[0]}", question, context.strip(), [answer], [start]))
    return out


def qa_gen(seed: int = 0, n_train: int = 1500, n_valid: int = 300, **_: Any) -> TextTaskData:
    """Generated passages about three people; each question's answer is a span of the passage."""
    data = []
    for split_seed, n in ((seed, n_train), (seed + 10_007, n_valid)):
        rng, index, examples = random.Random(split_seed), [0], []
        while len(examples) < n:
            examples += _passage(rng, index)
        data.append(examples[:n])
    return TextTaskData("qa", data[0], data[1], [])


GENERATED = {"sentiment-gen": sentiment_gen, "nli-gen": nli_gen, "ner-gen": ner_gen, "qa-gen": qa_gen}
KIND_OF_GENERATED = {"sentiment-gen": "classify", "nli-gen": "pair", "ner-gen": "tag", "qa-gen": "qa"}

# `divekit datasets` lists them; `divekit finetune --task ... --data NAME` reads them
for _name, _fn in GENERATED.items():
    register_dataset(_name, task="bert_finetune", offline=True,
                     description=f"{KIND_OF_GENERATED[_name]}: " + (_fn.__doc__ or "").split(".")[0])(_fn)
for _name, _fn in REAL.items():
    register_dataset(_name, task="bert_finetune", offline=False,
                     description=f"{KIND_OF_REAL[_name]}: read from --data-dir (see divekit.data.text_tasks)")(_fn)

__all__ = ["GENERATED", "KIND_OF_GENERATED", "ner_gen", "nli_gen", "qa_gen", "sentiment_gen"]
