"""The shipped CEFR data (data/cefr) and the `cefr_words` format that groups a user's own
word + example-sentence rows into list records; plus the seeds' alpaca JSON list."""

import json
from collections import Counter
from pathlib import Path

import pytest

from mlxtune.data.records import build_dataset, load_records, record_to_messages
from mlxtune.errors import MlxtuneError
from mlxtune.evaluation.metrics import uses_word, words_of
from mlxtune.recipe.schema import DataConfig
from mlxtune.recipe.loading import load_recipe
from mlxtune.data.wordlists import group_rows, split_and_group

REPO = Path(__file__).resolve().parent.parent
CEFR = REPO / "data" / "cefr"
LISTS = {"A1": CEFR / "cefr_a1_list.jsonl", "A2": CEFR / "cefr_a2_list.jsonl"}


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def size_buckets(records):
    sizes = Counter(len(r["words"]) for r in records)
    return sizes[10], sizes[8] + sizes[9], sizes[6] + sizes[7], sum(sizes.values())


@pytest.mark.parametrize("level", sorted(LISTS))
def test_shipped_lists_sizes_words_and_sentences(level):
    recs = read_jsonl(LISTS[level])
    assert size_buckets(recs) == (210, 60, 30, 300)
    pairs = {(r["word"], r["sentence"]) for r in read_jsonl(CEFR / "sentences.jsonl") if r["level"] == level}
    for r in recs:
        assert r["level"] == level and len(set(r["words"])) == len(r["words"]) == len(r["sentences"])
        for w, s in zip(r["words"], r["sentences"]):
            assert (w, s) in pairs and uses_word(w, words_of(s)), (w, s)


def test_shipped_lists_are_rebuilt_byte_for_byte_by_the_core_grouping():
    rows = read_jsonl(CEFR / "sentences.jsonl")
    for level, path in LISTS.items():
        recs = group_rows([r for r in rows if r["level"] == level], str(CEFR / "sentences.jsonl"), 42, level, 300)
        assert "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs).encode() == path.read_bytes()


def test_sentences_file_rules():
    rows = read_jsonl(CEFR / "sentences.jsonl")
    per_word = Counter((r["level"], r["word"]) for r in rows)
    assert set(per_word.values()) == {2}
    words_per_level = Counter(lv for lv, _ in per_word)
    assert words_per_level["A1"] >= 150 and words_per_level["A2"] >= 150
    for r in rows:
        n = len(words_of(r["sentence"]))
        assert r["sentence"].isascii() and 6 <= n <= 14 and uses_word(r["word"], words_of(r["sentence"])), r


@pytest.mark.parametrize("level", sorted(LISTS))
def test_shipped_lists_load_with_the_recipe_format(tmp_path, tiny_tokenizer, level):
    p = tmp_path / "r.toml"
    p.write_text(f'[data]\ntrain = "{LISTS[level]}"\nformat = "cefr_list"\ntemplate = "plain"\nmax_seq_len = 512\n'
                 '[eval]\nmetrics = ["cefr"]\n')
    ds = build_dataset(load_recipe(p), tiny_tokenizer)
    assert len(ds.train) == 270 and len(ds.eval) == 30
    assert all(r["level"] == level for r in ds.eval_records)


def user_rows(n_words=30, per_word=3, level=None):
    rows = []
    for i in range(n_words):
        for j in range(per_word):
            row = {"word": f"w{i}", "sentence": f"sentence {j} about w{i}."}
            if level:
                row["level"] = level
            rows.append(row)
    return rows


def test_grouping_sizes_distinct_words_and_seed():
    rows = user_rows()
    recs = group_rows(rows, "u.jsonl", seed=7, level="A1", records=100)
    assert size_buckets(recs) == (70, 20, 10, 100)
    for r in recs:
        assert r["level"] == "A1" and len(set(r["words"])) == len(r["words"])
        assert all(s.endswith(f"about {w}.") for w, s in zip(r["words"], r["sentences"]))
    uses = Counter(w for r in recs for w in r["words"])
    assert len(uses) == 30 and max(uses.values()) - min(uses.values()) <= 2  # dealt evenly
    sent_uses = Counter(s for r in recs for s in r["sentences"])
    assert len(sent_uses) == 90  # every sentence of every word is used
    assert recs == group_rows(rows, "u.jsonl", seed=7, level="A1", records=100)
    assert recs != group_rows(rows, "u.jsonl", seed=8, level="A1", records=100)
    auto = group_rows(rows, "u.jsonl", seed=7, level="A1")
    assert len(auto) == 10  # ceil(90 rows / 9.35)


def test_grouping_by_level_and_level_filter():
    rows = user_rows(12, 1, "A1") + user_rows(12, 1, "A2")
    recs = group_rows(rows, "u.jsonl", seed=0, records=5)
    assert Counter(r["level"] for r in recs) == {"A1": 5, "A2": 5}
    only = group_rows(rows, "u.jsonl", seed=0, level="a2", records=3)
    assert {r["level"] for r in only} == {"A2"}


@pytest.mark.parametrize("row,msg", [
    ({"word": "cat"}, "u.jsonl: row 3: needs non-empty strings 'word' and 'sentence'"),
    ({"word": "cat", "sentence": "A cat.", "level": "Z9"}, "u.jsonl: row 3: level 'Z9' is not one of"),
    ("cat", "u.jsonl: row 3: not a JSON object"),
])
def test_malformed_row_names_file_and_row(row, msg):
    rows = user_rows(2, 1, "A1") + [row]
    with pytest.raises(MlxtuneError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        group_rows(rows, "u.jsonl", seed=0)


def test_missing_level_needs_cefr_level():
    with pytest.raises(MlxtuneError, match=r"u.jsonl: row 1: no 'level'.*data.cefr_level"):
        group_rows(user_rows(12, 1), "u.jsonl", seed=0)
    assert {r["level"] for r in group_rows(user_rows(12, 1), "u.jsonl", seed=0, level="B1")} == {"B1"}


def test_word_split_has_no_overlap():
    train, evals = split_and_group(user_rows(60, 2, "A1"), "u.jsonl", seed=3, eval_fraction=0.2)
    train_words = {w for r in train for w in r["words"]}
    eval_words = {w for r in evals for w in r["words"]}
    assert len(eval_words) == 12 and len(train_words) == 48 and not train_words & eval_words
    assert not {s for r in train for s in r["sentences"]} & {s for r in evals for s in r["sentences"]}
    assert (train, evals) == split_and_group(user_rows(60, 2, "A1"), "u.jsonl", seed=3, eval_fraction=0.2)
    with pytest.raises(MlxtuneError, match="at least 20"):
        split_and_group(user_rows(15, 2, "A1"), "u.jsonl", seed=3, eval_fraction=0.2)


def test_cefr_words_recipe_end_to_end(tmp_path, tiny_tokenizer):
    data = tmp_path / "words.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in user_rows(40, 2)))
    p = tmp_path / "r.toml"
    p.write_text(f'[data]\ntrain = "{data.name}"\nformat = "cefr_words"\ncefr_level = "A1"\ntemplate = "plain"\n'
                 'eval_fraction = 0.25\ncefr_records = 40\n[eval]\nmetrics = ["cefr"]\n')
    r = load_recipe(p)
    ds = build_dataset(r, tiny_tokenizer)
    assert len(ds.train_records) + len(ds.eval_records) == 40
    assert not {w for x in ds.train_records for w in x["words"]} & {w for x in ds.eval_records for w in x["words"]}
    answer = record_to_messages(ds.eval_records[0], r.data)[-1]["content"]
    assert answer.startswith("1. sentence ")
    # the shipped sentences file works the same way, one level at a time
    p.write_text(f'[data]\ntrain = "{CEFR / "sentences.jsonl"}"\nformat = "cefr_words"\ncefr_level = "A2"\n'
                 'template = "plain"\nmax_seq_len = 512\n')
    ds = build_dataset(load_recipe(p), tiny_tokenizer)
    assert {x["level"] for x in ds.train_records + ds.eval_records} == {"A2"}


def test_recipe_checks_for_cefr_words(tmp_path):
    assert DataConfig(train="x.jsonl", format="cefr_words", cefr_level="a1").cefr_level == "a1"
    with pytest.raises(ValueError, match="data.cefr_level"):
        DataConfig(train="x.jsonl", format="cefr_words", cefr_level="A7")
    p = tmp_path / "r.toml"
    p.write_text('[data]\ntrain = "x.jsonl"\nformat = "alpaca"\n[eval]\nmetrics = ["cefr"]\n')
    with pytest.raises(MlxtuneError, match='"cefr" needs data.format = "cefr_list" or "cefr_words"'):
        load_recipe(p)


def test_seed_001_alpaca_json_list_loads(tmp_path, tiny_tokenizer):
    """Seed 001's own files: a JSON list of {"instruction", "output"} records."""
    data = tmp_path / "training_data_a1_train.json"
    rows = [{"instruction": f"Write a sentence using the word '{w}'", "output": f"the {w} is big."}
            for w in ("cat", "dog", "sun", "moon", "sky")] * 4
    data.write_text(json.dumps(rows, indent=2))
    cfg = DataConfig(train=str(data), format="alpaca", template="alpaca")
    assert load_records(str(data), cfg, "r.toml") == rows
    p = tmp_path / "r.toml"
    p.write_text(f'[data]\ntrain = "{data.name}"\nformat = "alpaca"\ntemplate = "alpaca"\n')
    ds = build_dataset(load_recipe(p), tiny_tokenizer)
    assert len(ds.train) == 18 and len(ds.eval) == 2
    assert record_to_messages(rows[0], cfg)[0]["content"] == "Write a sentence using the word 'cat'"
