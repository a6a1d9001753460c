"""A synthetic mixture of tasks: generators whose text is easy to tell apart, plus a real-text slice.

Each generator is a pure function of a numpy Generator, so the dataset is fixed by the seed.
"""
from __future__ import annotations

import glob
import os
import sysconfig

import numpy as np

WORDS = ("the model routes each token to two experts and sums their outputs weighted by the router "
         "while a balancing loss keeps every expert busy during training on long documents").split()


def arithmetic(rng) -> str:
  a, b = rng.integers(0, 1000, 2)
  op = rng.choice(["+", "-", "*"])
  value = {"+": a + b, "-": a - b, "*": a * b}[op]
  return f"{a} {op} {b} = {value}\n"


def dna(rng) -> str:
  return "".join(rng.choice(list("ACGT"), int(rng.integers(40, 80)))) + "\n"


def hex_dump(rng) -> str:
  return " ".join(f"{int(x):02x}" for x in rng.integers(0, 256, 16)) + "\n"


def prose(rng) -> str:
  return " ".join(rng.choice(WORDS, int(rng.integers(8, 16)))).capitalize() + ".\n"


def python_source(rng) -> str:
  """The real-text slice: a random excerpt of the standard library's own source."""
  files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
  with open(files[int(rng.integers(len(files)))], encoding="utf-8", errors="replace") as f:
    text = f.read()
  start = int(rng.integers(0, max(1, len(text) - 400)))
  return text[start:start + 400]


TASKS = {"arithmetic": arithmetic, "dna": dna, "hex": hex_dump, "prose": prose, "python": python_source}


def documents(num_per_task: int, seed: int) -> list[tuple[str, str]]:
  """[(task, text)], each document 4-6 samples of one task, interleaved across tasks."""
  rng = np.random.default_rng(seed)
  docs = []
  for _ in range(num_per_task):
    for task, fn in TASKS.items():
      docs.append((task, "".join(fn(rng) for _ in range(int(rng.integers(4, 7))))))
  return docs


def token_class(byte: int) -> str:
  c = chr(byte) if byte < 128 else "\x80"
  if c.isdigit():
    return "digit"
  if c.isalpha():
    return "letter"
  if c.isspace():
    return "space"
  return "punct" if c.isprintable() else "other"
