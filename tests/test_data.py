"""The data contract: golden token ids and loss masks per format, with a readable word-level
tokenizer, and the guarantee that generation prompts are exactly the training prefixes."""

import json

import numpy as np
import pytest

from mlxtune.data.records import build_dataset, encode_messages, encode_prompt, load_records, record_to_messages
from mlxtune.errors import MlxtuneError
from mlxtune.recipe.schema import DataConfig
from mlxtune.recipe.loading import load_recipe

PC = {"prompt": "say hello", "completion": "hello world"}
CASES = {
    "prompt_completion/chat": ("prompt_completion", {}, PC,
        "<|user|> say hello </s> <|assistant|> [hello] [world] [</s>]"),
    "prompt_completion/alpaca": ("prompt_completion", {"template": "alpaca"}, PC,
        "<s> ### Instruction : say hello ### Response : [hello] [world] [</s>]"),
    "prompt_completion/plain": ("prompt_completion", {"template": "plain"}, PC,
        "<s> say hello [hello] [world] [</s>]"),
    "prompt_completion/custom": ("prompt_completion", {"template": "Q: {prompt} A:"}, PC,
        "<s> <unk> : say hello <unk> : [hello] [world] [</s>]"),
    "chat/multi-turn": ("chat", {}, {"messages": [
        {"role": "system", "content": "be big"}, {"role": "user", "content": "say hello"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "count to two"},
        {"role": "assistant", "content": "one two"}]},
        "<|system|> <unk> big </s> <|user|> say hello </s> <|assistant|> [hello] [</s>] "
        "<|user|> count to two </s> <|assistant|> [one] [two] [</s>]"),
    "chat/system_prompt": ("chat", {"system_prompt": "be big"}, {"messages": [
        {"role": "user", "content": "say hello"}, {"role": "assistant", "content": "hello"}]},
        "<|system|> <unk> big </s> <|user|> say hello </s> <|assistant|> [hello] [</s>]"),
    "alpaca": ("alpaca", {"template": "alpaca"}, {"instruction": "add x", "input": "two three", "output": "five"},
        "<s> ### Instruction : add x two three ### Response : [five] [</s>]"),
    "text": ("text", {"loss_on": "full"}, {"text": "the cat is big"},
        "<s> [the] [cat] [is] [big] [</s>]"),
    "translation": ("translation", {}, {"source": "hello world", "target": "yes"},
        "<|user|> Translate the <unk> English text to Turkish . hello world </s> <|assistant|> [yes] [</s>]"),
    "cefr_list": ("cefr_list", {}, {"level": "A1", "words": ["cat", "dog"], "sentences": ["the cat is big.", "the dog is small."]},
        "<|user|> Generate A1 - level English sentences for these 2 words : 1 . cat 2 . dog <unk> numbered "
        "sentences ( 1 - 2 <unk> using each word naturally and appropriately for A1 level . </s> <|assistant|> "
        "[1] [.] [the] [cat] [is] [big] [.] [2] [.] [the] [dog] [is] [small] [.] [</s>]"),
    "code": ("code", {}, {"problem": "write add", "solution": "def add(x, y):\n    return x + y\n"},
        "<|user|> write add </s> <|assistant|> [<unk>] [python] [def] [add] [(] [x] [,] [y] [<unk>] [return] [x] [+] [y] [<unk>] [</s>]"),
}


def marked(tok, ex):
    words = tok.convert_ids_to_tokens(ex.tokens.tolist())
    return " ".join(f"[{w}]" if m else w for w, m in zip(words, ex.loss_mask))


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_tokens_and_masks(tiny_tokenizer, case):
    fmt, kw, rec, expected = CASES[case]
    cfg = DataConfig(train="x.jsonl", format=fmt, **kw)
    ex = encode_messages(record_to_messages(rec, cfg), cfg, tiny_tokenizer)
    assert ex.tokens.dtype == np.int32 and ex.loss_mask.dtype == bool
    assert marked(tiny_tokenizer, ex) == expected
    assert not ex.loss_mask[0]


def test_golden_ids(tiny_tokenizer):
    ex = encode_messages(record_to_messages(PC, cfg := DataConfig(train="x", format="prompt_completion")), cfg, tiny_tokenizer)
    v = tiny_tokenizer.convert_tokens_to_ids
    assert ex.tokens.tolist() == [v("<|user|>"), v("say"), v("hello"), 2, v("<|assistant|>"), v("hello"), v("world"), 2]


@pytest.mark.parametrize("case", [c for c in sorted(CASES) if not c.startswith("text")])
def test_generation_prompt_is_the_training_prefix(tiny_tokenizer, case):
    fmt, kw, rec, _ = CASES[case]
    cfg = DataConfig(train="x.jsonl", format=fmt, **kw)
    ex = encode_messages(record_to_messages(rec, cfg), cfg, tiny_tokenizer)
    prompt = encode_prompt(rec, cfg, tiny_tokenizer)
    last_untrained = np.flatnonzero(~ex.loss_mask)
    # the prompt is everything up to the final response
    first_of_last_response = max(i for i in range(1, len(ex)) if ex.loss_mask[i] and not ex.loss_mask[i - 1])
    assert prompt.tolist() == ex.tokens[:first_of_last_response].tolist()
    assert last_untrained.size


def test_real_chat_template_masks_exactly_the_response(embedded_model_dir):
    from mlxtune.models.source import load_tokenizer

    tok = load_tokenizer(embedded_model_dir)
    rec = {"level": "A1", "words": ["cat", "sun"], "sentences": ["I have a cat.", "The sun is hot."]}
    cfg = DataConfig(train="x", format="cefr_list")
    ex = encode_messages(record_to_messages(rec, cfg), cfg, tok)
    trained = tok.decode(ex.tokens[ex.loss_mask].tolist())
    assert trained == "1. I have a cat.\n2. The sun is hot.<|im_end|>\n"
    prompt = tok.decode(encode_prompt(rec, cfg, tok).tolist())
    assert prompt.endswith("<|im_start|>assistant\n") and "Generate A1-level English sentences for these 2 words" in prompt
    assert tok.decode(ex.tokens.tolist()) == tok.apply_chat_template(
        [{"role": "user", "content": prompt.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]},
         {"role": "assistant", "content": "1. I have a cat.\n2. The sun is hot."}], tokenize=False)


def test_bad_rows_name_file_row_and_field(tmp_path, tiny_tokenizer):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    cfg = DataConfig(train=str(p), format="prompt_completion")
    rows = load_records(str(p), cfg, "r.toml")
    with pytest.raises(MlxtuneError, match=r"d.jsonl: record 2: missing field\(s\) completion.*data.columns"):
        from mlxtune.data.records import record_to_messages
        for i, r in enumerate(rows, 1):
            record_to_messages(r, cfg, str(p), i)
    p.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n')
    with pytest.raises(MlxtuneError, match=r"d.jsonl:2: not valid JSON"):
        load_records(str(p), cfg, "r.toml")
    p.write_text("\n")
    with pytest.raises(MlxtuneError, match="empty"):
        load_records(str(p), cfg, "r.toml")
    with pytest.raises(MlxtuneError, match="data file not found"):
        load_records(str(tmp_path / "missing.jsonl"), cfg, "r.toml")


def test_columns_mapping_and_csv(tmp_path, tiny_tokenizer):
    p = tmp_path / "pairs.csv"
    p.write_text("en,tr\nhello world,yes\nsay hello,no\n")
    cfg = DataConfig(train=str(p), format="translation", columns={"source": "en", "target": "tr"})
    rows = load_records(str(p), cfg, "r.toml")
    assert rows[0]["source"] == "hello world" and rows[1]["target"] == "no"


def test_dotted_columns_read_nested_fields_and_set_parses_a_table(tmp_path):
    # OPUS-style rows, renamed with the --set form the EN->TR recipes document
    p = tmp_path / "opus.jsonl"
    p.write_text(json.dumps({"translation": {"en": "hello world", "tr": "merhaba"}, "id": 7}) + "\n")
    (tmp_path / "r.toml").write_text('[data]\ntrain = "opus.jsonl"\nformat = "translation"\n')
    recipe = load_recipe(tmp_path / "r.toml", ['data.columns={source="translation.en", target="translation.tr"}'])
    rows = load_records(str(p), recipe.data, "r.toml")
    assert rows == [{"id": 7, "source": "hello world", "target": "merhaba"}]


def test_max_eval_examples_caps_a_separate_eval_file(tmp_path, tiny_tokenizer):
    recs = [{"prompt": "say hello", "completion": "hello world"}] * 5
    (tmp_path / "e.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    recipe = _recipe(tmp_path, recs, eval="e.jsonl", max_eval_examples=2)
    assert len(build_dataset(recipe, tiny_tokenizer).eval) == 2


def _recipe(tmp_path, records, **data):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in data.items())
    (tmp_path / "r.toml").write_text(f'[data]\ntrain = "d.jsonl"\nformat = "prompt_completion"\n{extra}')
    return load_recipe(tmp_path / "r.toml")


def test_overlong_is_counted_and_handled_as_asked(tmp_path, tiny_tokenizer):
    long = {"prompt": "say " * 10, "completion": "hello " * 10}
    short = {"prompt": "say hello", "completion": "hello world"}
    records = [long] * 3 + [short] * 17
    with pytest.raises(MlxtuneError, match=r"3 of \d+ examples are longer than data.max_seq_len = 16.*overlong"):
        build_dataset(_recipe(tmp_path, records, max_seq_len=16), tiny_tokenizer)
    ds = build_dataset(_recipe(tmp_path, records, max_seq_len=16, overlong="drop"), tiny_tokenizer)
    stats = {k: v.summary() for k, v in ds.stats.items()}
    assert stats["train"]["overlong"] + stats["eval"]["overlong"] == 3
    assert stats["train"]["dropped"] + stats["eval"]["dropped"] == 3
    assert max(len(e) for e in ds.train + ds.eval) <= 16
    assert long not in ds.train_records + ds.eval_records and len(ds.train_records) == len(ds.train)
    ds = build_dataset(_recipe(tmp_path, records, max_seq_len=16, overlong="truncate"), tiny_tokenizer)
    assert len(ds.train) + len(ds.eval) == 20 and max(len(e) for e in ds.train + ds.eval) == 16
    with pytest.raises(MlxtuneError, match="no example left"):
        build_dataset(_recipe(tmp_path, [long] * 5, max_seq_len=16, overlong="drop"), tiny_tokenizer)


def test_split_is_seeded_and_disjoint(tmp_path, tiny_tokenizer):
    records = [{"prompt": f"count to {w}", "completion": f"{w} {c}"} for w in "one two three four five six seven eight nine ten".split() for c in ("cat", "dog")]
    a = build_dataset(_recipe(tmp_path, records, eval_fraction=0.2), tiny_tokenizer)
    b = build_dataset(_recipe(tmp_path, records, eval_fraction=0.2), tiny_tokenizer)
    c = build_dataset(_recipe(tmp_path, records, eval_fraction=0.2, split_seed=1), tiny_tokenizer)
    assert len(a.eval) == 4 and len(a.train) == 16
    assert a.eval_records == b.eval_records and a.eval_records != c.eval_records
    assert all(r not in a.train_records for r in a.eval_records)
    assert sorted(map(json.dumps, a.train_records + a.eval_records)) == sorted(map(json.dumps, records))
