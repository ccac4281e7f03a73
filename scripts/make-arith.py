#!/usr/bin/env python3
"""Writes the quickstart's procedurally generated word problems (GSM8K shape):
datasets/arith_train.jsonl and datasets/arith_heldout.jsonl.

One-step addition and subtraction stories with exact answers. The two splits are disjoint by
construction: every (name, item, a, b, operation) is assigned to a split by a hash of the
numbers alone, so no held-out problem shares its numbers and operation with a training
problem, and the held-out set uses names and items the training set never sees.

    python3 scripts/make-arith.py            # rewrites both files (deterministic)
"""
import hashlib
import json
import random
from pathlib import Path

TRAIN_NAMES = ["Ana", "Ben", "Carla", "David", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jack"]
HELD_NAMES = ["Kara", "Liam", "Maya", "Noah", "Olga", "Pablo", "Quinn", "Rosa", "Sam", "Tina"]
TRAIN_ITEMS = ["apples", "books", "coins", "marbles", "pencils", "stickers"]
HELD_ITEMS = ["cards", "shells", "stamps", "buttons", "cookies", "toys"]
ADD = [
    "{n} has {a} {i}. {n} gets {b} more {i}. How many {i} does {n} have now?",
    "{n} had {a} {i}. Then {n} found {b} more {i}. How many {i} does {n} have in total?",
]
SUB = [
    "{n} has {a} {i}. {n} gives away {b} {i}. How many {i} does {n} have left?",
    "{n} had {a} {i} and lost {b} of them. How many {i} does {n} have now?",
]


def split_of(a: int, b: int, op: str) -> str:
    h = hashlib.sha256(f"{a},{b},{op}".encode()).digest()[0]
    return "heldout" if h < 64 else "train"  # about a quarter held out


def make(split: str, count: int, seed: int):
    rng = random.Random(seed)
    names = TRAIN_NAMES if split == "train" else HELD_NAMES
    items = TRAIN_ITEMS if split == "train" else HELD_ITEMS
    seen = set()
    rows = []
    while len(rows) < count:
        op = rng.choice(["add", "sub"])
        a = rng.randint(5, 60)
        b = rng.randint(2, 40) if op == "add" else rng.randint(1, a - 1)
        if split_of(a, b, op) != split or (a, b, op) in seen:
            continue
        seen.add((a, b, op))
        n, i = rng.choice(names), rng.choice(items)
        tpl = rng.choice(ADD if op == "add" else SUB)
        ans = a + b if op == "add" else a - b
        sign = "+" if op == "add" else "-"
        rows.append({
            "id": f"arith-{split}-{len(rows)}",
            "question": tpl.format(n=n, a=a, b=b, i=i),
            "answer": f"{a} {sign} {b} = {ans}. The answer is {ans}.\n#### {ans}",
        })
    return rows


def main():
    root = Path(__file__).resolve().parent.parent / "datasets"
    for split, count, seed in [("train", 400, 1), ("heldout", 200, 2)]:
        rows = make(split, count, seed)
        with open(root / f"arith_{split}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        print(f"{root / f'arith_{split}.jsonl'}: {len(rows)} problems")


if __name__ == "__main__":
    main()
