"""Evaluation metrics, defined once for every backend.

Losses arrive from the backends as (sum of token NLL, number of tokens); everything here is
plain Python. sacrebleu and cefrpy (the `eval` extra) are imported inside the functions that
need them, so importing this module stays framework-free.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import Any, Iterable

from mlxtune.data.wordlists import CEFR_LEVELS
from mlxtune.errors import MlxtuneError

# Two losses exist and are never shown without saying which one (seed 001 mixed them up).
LOSS_LABELS: dict[str, str] = {
    "loss": "eval loss (response only)",
    "loss_full": "eval loss (full text)",
    "ppl": "perplexity (response only)",
    "ppl_full": "perplexity (full text)",
}

# Direction of every metric a checkpoint can be picked by (pass@k for any k: see higher_is_better).
HIGHER_IS_BETTER: dict[str, bool] = {
    "eval_loss": False, "eval_loss_full": False, "loss": False, "loss_full": False,
    "ppl": False, "ppl_full": False,
    "bleu": True, "chrf": True, "pass@1": True, "cefr": True, "word_usage": True, "level_ok": True,
}

_EVAL_EXTRA = "pip install 'mlxtune[eval]'"


# ------------------------------------------------------------------ losses


def token_weighted_loss(parts: Iterable[tuple[float, int]]) -> float:
    """Mean NLL per token over (loss_sum, n_tokens) parts: sum of sums / sum of counts.

    This is the only way losses are combined (batches, accumulation steps, eval), so batch
    size and padding never change the number."""
    total, count = 0.0, 0
    for loss_sum, n in parts:
        total += float(loss_sum)
        count += int(n)
    if count <= 0:
        raise ValueError("token_weighted_loss: no tokens carry loss")
    return total / count


def perplexity(loss: float) -> float:
    """exp(loss) of a per-token loss; inf instead of an OverflowError for huge losses."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def reduction_pct(base: float, tuned: float) -> float:
    """(base - tuned) / base * 100: positive when the tuned value is lower (better for losses).

    NaN when ``base`` is 0, where a relative change is undefined."""
    if base == 0:
        return math.nan
    return (base - tuned) / base * 100.0


def higher_is_better(metric: str) -> bool:
    """Direction of a metric name; ``pass@k`` is higher-is-better for every k."""
    if metric in HIGHER_IS_BETTER:
        return HIGHER_IS_BETTER[metric]
    if re.fullmatch(r"pass@\d+", metric):
        return True
    raise MlxtuneError(f"unknown metric '{metric}': choose one of {', '.join(HIGHER_IS_BETTER)} or pass@k")


def is_better(metric: str, new: float, old: float | None) -> bool:
    """Whether ``new`` beats ``old`` (None: nothing yet) for ``metric``; NaN never wins."""
    if new is None or math.isnan(new):
        return False
    if old is None or math.isnan(old):
        return True
    return new > old if higher_is_better(metric) else new < old


# eval-event key of each `best_metric` name that differs from it
METRIC_KEYS = {"eval_loss": "loss", "eval_loss_full": "loss_full"}


def metric_value(ev: dict[str, Any], name: str) -> float | None:
    """The value of the `best_metric` ``name`` in an eval event (None when it has none)."""
    v = ev.get(METRIC_KEYS.get(name, name))
    return None if v is None else float(v)


# ------------------------------------------------------------------ BLEU / chrF


def _check_pairs(hyps: list[str], refs: list[str], what: str) -> None:
    if len(hyps) != len(refs):
        raise ValueError(f"{what}: {len(hyps)} hypotheses but {len(refs)} references")
    if not hyps:
        raise ValueError(f"{what}: no sentences to score")


def _sacrebleu_metrics() -> Any:
    try:
        from sacrebleu import metrics
    except ModuleNotFoundError:
        raise MlxtuneError(f"BLEU and chrF need the 'sacrebleu' package: {_EVAL_EXTRA}") from None
    return metrics


def bleu(hyps: list[str], refs: list[str], tokenize: str | None = None) -> dict[str, Any]:
    """Corpus BLEU (0-100) with sacrebleu's defaults (13a tokenizer, exp smoothing), one
    reference per hypothesis, and the signature that says exactly how it was computed."""
    _check_pairs(hyps, refs, "bleu")
    metric = _sacrebleu_metrics().BLEU(tokenize=tokenize)
    score = metric.corpus_score(list(hyps), [list(refs)])
    return {"bleu": float(score.score), "bleu_signature": str(metric.get_signature())}


def chrf(hyps: list[str], refs: list[str], word_order: int = 0) -> dict[str, Any]:
    """Corpus chrF (0-100; ``word_order=2`` gives chrF++) with sacrebleu's signature."""
    _check_pairs(hyps, refs, "chrf")
    metric = _sacrebleu_metrics().CHRF(word_order=word_order)
    score = metric.corpus_score(list(hyps), [list(refs)])
    return {"chrf": float(score.score), "chrf_signature": str(metric.get_signature())}


# ------------------------------------------------------------------ pass@k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k) for n samples, c correct.

    Computed as a product, 1 - prod_{i=n-c+1..n} (1 - k/i), so large n never overflows."""
    if n < 1 or k < 1 or not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs n >= 1, k >= 1 and 0 <= c <= n (got n={n}, c={c}, k={k})")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean_pass_at_k(counts: list[tuple[int, int]], k: int) -> float:
    """Mean pass@k over problems given (n samples, c correct) per problem."""
    if not counts:
        raise ValueError("mean_pass_at_k: no problems")
    short = [n for n, _ in counts if n < k]
    if short:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem; {len(short)} problem(s) have fewer (e.g. {short[0]})")
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)


# ------------------------------------------------------------------ CEFR

# "1. text", "1) text", "1: text", "1 - text", "(1) text", "**1.** text", "- 1. text"
_NUMBERED = re.compile(r"^\s*(?:[-*•]\s+)?[*_]{0,2}\(?(\d{1,4})(?:\s?[.):\-–][*_]{0,2}|[*_]{1,2}[.):\-–])(?:\s+|$|(?=[^\d\s]))(.*)$")
_MAX_JUMP = 10  # a "number" further than this past the largest so far is text (a year), not a new item


def parse_numbered(text: str) -> list[str]:
    """Numbered sentences of a model answer, by number: ``result[i - 1]`` is item ``i``.

    The rule: a line that starts with a number followed by ``.``, ``)``, ``:`` or ``-`` (and not
    by another digit, so "3.5 million" is text), optionally inside ``**``/``__`` or after a
    ``-``/``*`` bullet, starts item N. Lines
    before the first item (a preamble) are ignored; blank lines are skipped; any other line
    continues the current item. Missing numbers leave an empty string in their place, so the
    positions still line up with the target words; a repeated number keeps its first item.
    Numbers below 1, or more than 10 past the largest number seen so far (a year such as
    "2024. It rained"), do not start an item.
    """
    items: dict[int, list[str]] = {}
    current: int | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        m = _NUMBERED.match(line)
        if m and 1 <= int(m.group(1)) <= max(items, default=0) + _MAX_JUMP:
            n = int(m.group(1))
            if n in items:
                current = None  # a restarted list: ignore the repeat and what follows it
                continue
            items[n] = [m.group(2).strip()]
            current = n
        elif current is not None:
            items[current].append(line.strip())
    if not items:
        return []
    return [" ".join(items.get(i, [])) for i in range(1, max(items) + 1)]


_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")
_NT = {"ca": "can", "wo": "will", "sha": "shall", "ai": "be"}


def words_of(text: str) -> list[str]:
    """Lower-cased alphabetic words; contractions give their base word ("don't" -> do, not;
    "it's" -> it; "can't" -> can, not), so "'s", "'re", "'ll" are never counted as words."""
    out: list[str] = []
    for tok in _WORD.findall(text.lower().replace("\u2019", "'")):
        if "'" not in tok:
            out.append(tok)
        elif tok.endswith("n't"):
            out += [_NT.get(tok[:-3], tok[:-3]), "not"]
        else:
            out.append(tok.split("'")[0])
    return [w for w in out if w]


# Irregular forms a rule cannot produce: base -> other forms (verbs: past, participle, -s/-ing
# where odd; nouns: plural; adjectives: comparative, superlative).
_IRREGULAR_TEXT = """
be am is are was were been being; have has had having; do does did done doing; go goes went gone
say said; make made; take took taken; come came; see saw seen; know knew known; get got gotten
give gave given; find found; think thought; tell told; become became; leave left; feel felt
bring brought; begin began begun; keep kept; hold held; write wrote written; stand stood
hear heard; let; mean meant; set; meet met; run ran; pay paid; sit sat; speak spoke spoken
lie lay lain lied lying; lead led; read; grow grew grown; lose lost; fall fell fallen; send sent
build built; understand understood; draw drew drawn; break broke broken; spend spent; cut
rise rose risen; drive drove driven; buy bought; wear wore worn; choose chose chosen; seek sought
throw threw thrown; catch caught; deal dealt; win won; forget forgot forgotten; sell sold
teach taught; fight fought; eat ate eaten; drink drank drunk; swim swam swum; sing sang sung
ring rang rung; sleep slept; fly flew flown flies; ride rode ridden; hide hid hidden; bite bit bitten
shake shook shaken; steal stole stolen; wake woke woken; freeze froze frozen; forgive forgave forgiven
shoot shot; shut; hit; hurt; put; cost; quit; spread; split; bet; beat beaten; burn burnt
dream dreamt; learn learnt; smell smelt; spell spelt; spill spilt; light lit; feed fed; lend lent
bend bent; bleed bled; blow blew blown; dig dug; hang hung; kneel knelt; lay laid; show shown
sink sank sunk; stick stuck; sting stung; strike struck; swear swore sworn; sweep swept; swing swung
tear tore torn; weep wept; wind wound; withdraw withdrew withdrawn; can could; will would; shall should
may might; arise arose arisen; awake awoke awoken; bear bore born borne; bind bound; breed bred
flee fled; grind ground; leap leapt; slide slid; spin spun; tread trod trodden; undertake undertook undertaken
child children; man men; woman women; person people; foot feet; tooth teeth; mouse mice; goose geese
ox oxen; die dice died dying; tie tying; crisis crises; analysis analyses; phenomenon phenomena
criterion criteria; cactus cacti; fungus fungi; knife knives; wife wives; life lives; leaf leaves
half halves; wolf wolves; shelf shelves; loaf loaves; thief thieves; potato potatoes; tomato tomatoes
hero heroes; echo echoes; good better best; bad worse worst; well better best; far farther further farthest furthest
little less least; many more most; much more most; old elder eldest
"""


def _irregular_table(text: str) -> dict[str, set[str]]:
    table: dict[str, set[str]] = {}
    for group in text.replace("\n", ";").split(";"):
        forms = group.split()
        if forms:
            table.setdefault(forms[0], set()).update(forms)
    return table


_IRREGULAR = _irregular_table(_IRREGULAR_TEXT)
_VOWELS = set("aeiou")


@lru_cache(maxsize=4096)
def inflections(word: str) -> frozenset[str]:
    """The forms that count as using ``word`` (lower-cased): the word itself; plural and third
    person -s / -es / -ies / -ves; past -ed / -d / -ied; -ing with e-drop (make -> making),
    ie -> ying (lie -> lying) and final-consonant doubling (run -> running, stop -> stopped);
    comparative and superlative -er / -est with the same spelling rules (big -> bigger,
    happy -> happiest); and a built-in table of common irregular verbs, nouns and adjectives
    (go -> went, gone; child -> children; good -> better, best). Both spellings are accepted
    where English hesitates (travelled / traveled). No other derivations (quick -> quickly)."""
    w = word.lower()
    forms = {w} | _IRREGULAR.get(w, set())
    if len(w) < 2:
        return frozenset(forms)
    last, before = w[-1], w[-2]
    if last == "y" and before not in _VOWELS:
        stem = w[:-1]
        forms |= {stem + "ies", stem + "ied", stem + "ier", stem + "iest", w + "ing"}
    else:
        forms |= {w + "s"}
        if w.endswith(("s", "x", "z", "ch", "sh", "o")):
            forms.add(w + "es")
        if w.endswith("ie"):
            forms |= {w[:-2] + "ying", w + "d", w + "r", w + "st"}
        elif last == "e":
            forms |= {w + "d", w[:-1] + "ing", w + "r", w + "st"}
            if before in "eoy":  # see -> seeing, hoe -> hoeing, dye -> dyeing
                forms.add(w + "ing")
        else:
            forms |= {w + "ed", w + "ing", w + "er", w + "est"}
        if w.endswith("fe"):
            forms.add(w[:-2] + "ves")
        elif last == "f":
            forms.add(w[:-1] + "ves")
    # consonant-vowel-consonant ending doubles its consonant (not w, x, y): stop -> stopped
    if len(w) >= 3 and last not in _VOWELS | set("wxy") and before in _VOWELS and w[-3] not in _VOWELS:
        forms |= {w + last + suffix for suffix in ("ed", "ing", "er", "est")}
    if w.endswith("c"):  # panic -> panicked, picnicking
        forms |= {w + "ked", w + "king"}
    return frozenset(forms)


def uses_word(target: str, sentence_words: list[str]) -> bool:
    """Whether the sentence contains ``target`` or an inflection of it. A multi-word target
    ("get up", "ice cream") must appear as consecutive words, each possibly inflected."""
    parts = words_of(target)
    if not parts:
        return False
    options = [inflections(p) for p in parts]
    n = len(parts)
    return any(all(sentence_words[i + j] in options[j] for j in range(n)) for i in range(len(sentence_words) - n + 1))


def _level_number(level: str) -> int:
    key = str(level).strip().upper()
    if key not in CEFR_LEVELS:
        raise MlxtuneError(f"CEFR level {level!r} is not one of {', '.join(CEFR_LEVELS)}")
    return CEFR_LEVELS.index(key) + 1


@lru_cache(maxsize=1)
def _cefr_analyzer() -> Any:
    try:
        from cefrpy import CEFRAnalyzer
    except ModuleNotFoundError:
        raise MlxtuneError(f"the CEFR score needs the 'cefrpy' package: {_EVAL_EXTRA}") from None
    return CEFRAnalyzer()


@lru_cache(maxsize=65536)
def word_level(word: str) -> float | None:
    """CEFR level of a lower-cased word as a number (A1 = 1 ... C2 = 6), None when cefrpy does
    not know it. cefrpy stores inflected forms as words of their own ("went", "cats") with a
    level per part of speech, sometimes a half level (1.5); a word's level is the LOWEST over
    its parts of speech, since the sentence may use it in its easiest sense."""
    levels = _cefr_analyzer().get_pos_level_dict_for_word(word, word_level_as_float=True)
    return min(levels.values()) if levels else None


def cefr_score(level: str, words: list[str], output: str) -> dict[str, float]:
    """How well ``output`` follows a CEFR word-list prompt (N target words -> N numbered sentences).

    - ``word_usage``: share of the target words used in THEIR sentence: numbered sentence i
      (see :func:`parse_numbered`) contains target word i or an inflection of it
      (:func:`inflections`); a word used in another sentence, or a missing sentence, counts 0.
    - ``level_ok``: share of the output's words that cefrpy knows whose level (lowest over parts
      of speech, :func:`word_level`) is at or below ``level``; half levels count as the upper
      one (1.5 is above A1). Words are :func:`words_of` the whole output, preamble included.
      0 when the output has no known word.
    - ``unknown_words``: words skipped because cefrpy does not know them (names, typos, non-English).
    - ``sentences``: numbered sentences found.
    """
    target = _level_number(level)
    if not words:
        raise ValueError("cefr_score: the record has no target words")
    sentences = parse_numbered(output)
    used = sum(1 for i, w in enumerate(words) if i < len(sentences) and uses_word(w, words_of(sentences[i])))
    known = ok = unknown = 0
    for w in words_of(output):
        lvl = word_level(w)
        if lvl is None:
            unknown += 1
            continue
        known += 1
        ok += int(lvl <= target)
    return {
        "word_usage": used / len(words),
        "level_ok": ok / known if known else 0.0,
        "unknown_words": float(unknown),
        "sentences": float(sum(1 for s in sentences if s)),
    }


def cefr_corpus(items: list[tuple[str, list[str], str]]) -> dict[str, float]:
    """Mean of :func:`cefr_score` over (level, words, output) items, plus ``cefr`` (the mean of
    word_usage and level_ok: one number to pick a checkpoint by) and ``n`` (items)."""
    if not items:
        raise ValueError("cefr_corpus: no items")
    scores = [cefr_score(level, words, output) for level, words, output in items]
    out = {k: sum(s[k] for s in scores) / len(scores) for k in scores[0]}
    out["cefr"] = (out["word_usage"] + out["level_ok"]) / 2
    out["n"] = float(len(scores))
    return out
