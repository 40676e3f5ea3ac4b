#!/usr/bin/env python3
"""Build the list-format CEFR dataset from a one-word-per-line words file.

Reads a JSONL words file (one ``{"word", "pos", "sentence"}`` object per line, e.g.
``data/quickstart/a1_words.jsonl``) and writes ``cefr_list`` records, one JSON object per
line::

    {"level": "A1", "words": ["house", "eat", ...], "sentences": ["Our house ...", ...]}

where ``sentences[i]`` is the example sentence of ``words[i]``. This is the "N words in,
N numbered sentences out" task: mlxtune's ``cefr_list`` format turns each record into the
numbered-list prompt and the numbered-sentence answer.

List sizes follow the mix of the original experiment: 70% of records have 10 words, 20% have
8 or 9, and 10% have 6 or 7. Words are dealt from successive shuffled passes over the word
list, so every word is used about equally often (counts differ by at most one, apart from
the rare word held back a few slots to keep a record's words distinct) and no record
repeats a word.

The output depends only on the input file and the arguments (``random.Random(seed)``, stdlib
only). With no arguments it rebuilds the shipped file from the repository root or anywhere
else::

    python scripts/build_cefr_list.py
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter, deque
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WORDS = REPO / "data" / "quickstart" / "a1_words.jsonl"
DEFAULT_OUT = REPO / "data" / "quickstart" / "cefr_a1_list.jsonl"

# (share of records, possible list sizes): the size mix of the original experiment.
SIZE_MIX = ((0.7, (10,)), (0.2, (8, 9)), (0.1, (6, 7)))


def read_words(path: Path) -> list[tuple[str, str]]:
    """(word, sentence) pairs from a JSONL words file, in file order; words must be distinct."""
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                sys.exit(f"{path}:{n}: not valid JSON ({e.msg})")
            word, sentence = rec.get("word"), rec.get("sentence")
            if not (isinstance(word, str) and word.strip() and isinstance(sentence, str) and sentence.strip()):
                sys.exit(f"{path}:{n}: needs non-empty string fields 'word' and 'sentence'")
            key = word.strip().lower()
            if key in seen:
                sys.exit(f"{path}:{n}: duplicate word {word!r}")
            seen.add(key)
            pairs.append((word.strip(), sentence.strip()))
    if not pairs:
        sys.exit(f"{path}: no words")
    return pairs


def list_sizes(records: int, rng: random.Random) -> list[int]:
    """One list size per record, in the SIZE_MIX proportions (rounded), in shuffled order."""
    counts = [round(share * records) for share, _ in SIZE_MIX]
    counts[0] += records - sum(counts)  # rounding remainder goes to the 10-word bucket
    sizes = [rng.choice(options) for count, (_, options) in zip(counts, SIZE_MIX) for _ in range(count)]
    rng.shuffle(sizes)
    return sizes


class Dealer:
    """Deals word indices from consecutive shuffled passes over ``n`` words."""

    def __init__(self, n: int, rng: random.Random):
        self.n, self.rng, self.queue = n, rng, deque()

    def _refill(self) -> None:
        order = list(range(self.n))
        self.rng.shuffle(order)
        self.queue.extend(order)

    def take(self, k: int) -> list[int]:
        """k distinct indices; one already in this record waits at the front for the next."""
        chosen: list[int] = []
        held: list[int] = []
        while len(chosen) < k:
            if not self.queue:
                self._refill()
            i = self.queue.popleft()
            if i in chosen:
                held.append(i)
            else:
                chosen.append(i)
        self.queue.extendleft(reversed(held))
        return chosen


def build(pairs: list[tuple[str, str]], records: int, level: str, seed: int) -> list[dict]:
    rng = random.Random(seed)
    sizes = list_sizes(records, rng)
    if max(sizes, default=0) > len(pairs):
        sys.exit(f"lists of up to {max(sizes)} words need at least that many words (have {len(pairs)})")
    dealer = Dealer(len(pairs), rng)
    out = []
    for size in sizes:
        idx = dealer.take(size)
        out.append({"level": level, "words": [pairs[i][0] for i in idx], "sentences": [pairs[i][1] for i in idx]})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--words", type=Path, default=DEFAULT_WORDS, help="JSONL words file (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output JSONL (default: %(default)s)")
    ap.add_argument("--records", type=int, default=100, help="number of records (default: %(default)s)")
    ap.add_argument("--level", default="A1", help="CEFR level written into each record (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=42, help="random seed (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.records < 1:
        ap.error("--records must be at least 1")

    pairs = read_words(args.words)
    recs = build(pairs, args.records, args.level, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8", newline="\n") as f:
        for rec in recs:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")

    sizes = Counter(len(r["words"]) for r in recs)
    uses = Counter(w for r in recs for w in r["words"])
    print(f"wrote {len(recs)} records to {args.out}")
    print("list sizes: " + ", ".join(f"{k} words x{sizes[k]}" for k in sorted(sizes, reverse=True)))
    print(f"{len(uses)}/{len(pairs)} words used, each {min(uses.values())}-{max(uses.values())} times")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
