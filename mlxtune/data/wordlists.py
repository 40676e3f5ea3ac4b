"""Word + example-sentence rows -> CEFR word-list records (data format ``cefr_words``).

The users' raw CEFR data (seed 002) is one row per word and example sentence, several rows per
word; the task they train on is "N words of one level in, N numbered sentences out". This
module groups such rows into ``cefr_list`` records ({"level", "words", "sentences"}) with the
list sizes of their experiment: 70% of records with 10 words, 20% with 8 or 9, 10% with 6 or 7.

Words are dealt from successive shuffled passes over a level's words, so every word is used
about equally often and a record never repeats a word; each use of a word takes the next of its
sentences in a shuffled cycle. Everything is drawn from one ``random.Random(seed)``, so the same
rows and seed give the same records on every machine. The shipped ``data/cefr/*_list.jsonl``
files are built by this same code (``scripts/build_cefr_data.py``).

The train/eval split (:func:`split_and_group`) is made on WORDS, before grouping: eval records
are built only from held-out words, so no eval record, word or sentence is seen in training.
"""

from __future__ import annotations

import math
import random
from collections import deque
from typing import Any

from mlxtune.errors import MlxtuneError

CEFR_LEVELS = ("A1", "A2", "B1", "B2", "C1", "C2")

# (share of records, possible list sizes): the size mix of the users' experiment (seed 002)
SIZE_MIX = ((0.7, (10,)), (0.2, (8, 9)), (0.1, (6, 7)))
MEAN_SIZE = sum(share * sum(opts) / len(opts) for share, opts in SIZE_MIX)  # 9.35 words per record
ROW_HINT = 'format "cefr_words" needs rows {"word": str, "sentence": str} with an optional "level" (A1-C2)'

# level -> word -> its sentences, in file order
WordTable = dict[str, dict[str, list[str]]]


def read_word_rows(rows: list[Any], source: str, level: str = "") -> WordTable:
    """Check the rows and collect each word's sentences per level. ``level`` keeps only rows of
    that level (rows without a "level" field count as it); empty: every row must name its level.
    A word is matched case-insensitively and keeps its first spelling."""
    want = level.strip().upper()
    if want and want not in CEFR_LEVELS:
        raise MlxtuneError(f"{source}: data.cefr_level = {level!r} is not one of {', '.join(CEFR_LEVELS)}")
    table: WordTable = {}
    spelling: dict[tuple[str, str], str] = {}
    for i, row in enumerate(rows, 1):
        where = f"{source}: row {i}"
        if not isinstance(row, dict):
            raise MlxtuneError(f"{where}: not a JSON object; {ROW_HINT}")
        word, sentence = row.get("word"), row.get("sentence")
        if not (isinstance(word, str) and word.strip() and isinstance(sentence, str) and sentence.strip()):
            raise MlxtuneError(f"{where}: needs non-empty strings 'word' and 'sentence' (has: {', '.join(sorted(row)) or 'nothing'}); "
                               f"{ROW_HINT}; rename other column names with data.columns")
        raw_level = row.get("level")
        if raw_level in (None, ""):
            if not want:
                raise MlxtuneError(f"{where}: no 'level'; give every row a level or set data.cefr_level (e.g. \"A1\")")
            row_level = want
        else:
            row_level = str(raw_level).strip().upper()
            if row_level not in CEFR_LEVELS:
                raise MlxtuneError(f"{where}: level {raw_level!r} is not one of {', '.join(CEFR_LEVELS)}")
            if want and row_level != want:
                continue
        key = (row_level, word.strip().lower())
        shown = spelling.setdefault(key, word.strip())
        sentences = table.setdefault(row_level, {}).setdefault(shown, [])
        if sentence.strip() not in sentences:  # an exact repeat adds nothing
            sentences.append(sentence.strip())
    if not table:
        raise MlxtuneError(f"{source}: no rows" + (f" of level {want}" if want else "") + f"; {ROW_HINT}")
    return {lv: table[lv] for lv in CEFR_LEVELS if lv in table}


def list_sizes(records: int, rng: random.Random) -> list[int]:
    """One list size per record in the SIZE_MIX shares (rounded; the remainder goes to 10-word
    lists), in shuffled order."""
    counts = [round(share * records) for share, _ in SIZE_MIX]
    counts[0] += records - sum(counts)
    sizes = [rng.choice(options) for count, (_, options) in zip(counts, SIZE_MIX) for _ in range(count)]
    rng.shuffle(sizes)
    return sizes


class _Dealer:
    """Word indices from consecutive shuffled passes over ``n`` words."""

    def __init__(self, n: int, rng: random.Random):
        self.n, self.rng, self.queue = n, rng, deque[int]()

    def take(self, k: int) -> list[int]:
        """k distinct indices; one already in this record waits at the front for the next."""
        chosen: list[int] = []
        held: list[int] = []
        while len(chosen) < k:
            if not self.queue:
                order = list(range(self.n))
                self.rng.shuffle(order)
                self.queue.extend(order)
            i = self.queue.popleft()
            (held if i in chosen else chosen).append(i)
        self.queue.extendleft(reversed(held))
        return chosen


def auto_records(words: dict[str, list[str]]) -> int:
    """Records that use every (word, sentence) row about once."""
    return max(1, math.ceil(sum(len(s) for s in words.values()) / MEAN_SIZE))


def group_words(words: dict[str, list[str]], level: str, records: int, rng: random.Random,
                source: str = "<data>") -> list[dict[str, Any]]:
    """``records`` cefr_list records of one level from word -> sentences."""
    names = list(words)
    sizes = list_sizes(records, rng)
    if max(sizes, default=0) > len(names):
        raise MlxtuneError(f"{source}: level {level} has {len(names)} distinct words, too few for lists of up to "
                           f"{max(sizes)} words; add words (the eval split needs 10 of its own)")
    cycles: dict[int, deque[str]] = {}
    dealer = _Dealer(len(names), rng)
    out = []
    for size in sizes:
        chosen = dealer.take(size)
        sentences = []
        for i in chosen:
            cycle = cycles.get(i)
            if not cycle:
                order = list(words[names[i]])
                rng.shuffle(order)
                cycle = cycles[i] = deque(order)
            sentences.append(cycle.popleft())
        out.append({"level": level, "words": [names[i] for i in chosen], "sentences": sentences})
    return out


def group_rows(rows: list[Any], source: str, seed: int, level: str = "", records: int = 0) -> list[dict[str, Any]]:
    """All rows grouped into records, level by level (A1 first). ``records`` per level; 0: auto."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for lv, words in read_word_rows(rows, source, level).items():
        out += group_words(words, lv, records or auto_records(words), rng, source)
    return out


def split_and_group(rows: list[Any], source: str, seed: int, eval_fraction: float, level: str = "",
                    records: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, eval) records with DISJOINT words: per level, a seeded ``eval_fraction`` of the
    words (at least 10, the longest list) is held out and grouped on its own. ``records`` is the
    total per level, shared between the splits by their number of sentences; 0: auto."""
    rng = random.Random(seed)
    train: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    for lv, words in read_word_rows(rows, source, level).items():
        names = list(words)
        rng.shuffle(names)
        n_eval = max(max(SIZE_MIX[0][1]), round(len(names) * eval_fraction))
        if len(names) - n_eval < max(SIZE_MIX[0][1]):
            raise MlxtuneError(f"{source}: level {lv} has {len(names)} distinct words; a word-disjoint train/eval split "
                               f"needs at least {2 * max(SIZE_MIX[0][1])} (10 per split), or give data.eval")
        held = set(names[:n_eval])
        parts = [{w: s for w, s in words.items() if w not in held}, {w: s for w, s in words.items() if w in held}]
        if records:
            rows_per = [sum(len(s) for s in p.values()) for p in parts]
            n_ev = max(1, round(records * rows_per[1] / sum(rows_per)))
            counts = [max(1, records - n_ev), n_ev]
        else:
            counts = [auto_records(p) for p in parts]
        train += group_words(parts[0], lv, counts[0], rng, source)
        evals += group_words(parts[1], lv, counts[1], rng, source)
    rng.shuffle(train)  # mix levels; the loop shuffles again per epoch
    return train, evals
