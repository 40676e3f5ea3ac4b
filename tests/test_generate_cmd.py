"""`mlxtune generate` (issue 14): a run's model on prompts in the run's own template, on both
backends: one prompt streams exactly the text generate_texts gives, --file writes one JSONL row
per input equal to the backend's own output, --base is the base model, a model folder is the
base with its chat template, and bad input is one line and exit 2."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mlxtune.cli.main import cli
from mlxtune.recipe.loading import load_recipe

from conftest import TINY_RECIPE_HEAD, TINY_RECORDS, write_jsonl

PROMPTS = ["count to three", "say hello", "what color is the sky"]


def invoke(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


def direct(run, backend, prompts, adapter=True, **settings):
    """What the backend gives for ``prompts`` (strings: user messages) through generate_texts."""
    from mlxtune.evaluation.chat import user_prompt
    from mlxtune.evaluation.generation import GenSettings, generate_texts
    from mlxtune.export.merge import adapter_folder, run_recipe
    from mlxtune.training.session import load_for_use

    recipe = run_recipe(run)
    b, tok, _ = load_for_use(recipe, backend, adapter_folder(run, None) if adapter else None)
    ids = [user_prompt(p, recipe.data, tok) for p in prompts]
    s = GenSettings(**{"max_tokens": 12, **settings})
    return generate_texts(b, tok, ids, s, adapter=adapter), (b, tok, ids, s)


def test_single_prompt_streams_generate_texts_text(trained):
    from mlxtune.evaluation.chat import stream_one

    backend, run = trained
    for settings, flags in [({}, []), ({"temperature": 0.9, "seed": 5}, ["--temperature", "0.9", "--seed", "5"])]:
        (want,), (b, tok, ids, s) = direct(run, backend, PROMPTS[:1], **settings)
        res = invoke("generate", run, PROMPTS[0], "--max-tokens", 12, "--backend", backend, *flags)
        assert res.exit_code == 0, res.output
        assert res.stdout == want + "\n" and want
        pieces: list[str] = []
        assert stream_one(b, tok, ids[0], s, pieces.append) == want
        assert "".join(pieces) == want and len(pieces) > 1  # streamed token by token, never taken back


def test_file_writes_one_row_per_input_equal_to_the_backend(trained, tmp_path):
    backend, run = trained
    record = dict(TINY_RECORDS[0])  # a record of the run's own data file (its completion is ignored)
    rows = [{"prompt": PROMPTS[1]}, record, PROMPTS[2], {"prompt": PROMPTS[0]}]
    src = write_jsonl(tmp_path / "prompts.jsonl", rows)
    want, _ = direct(run, backend, [PROMPTS[1], record["prompt"], PROMPTS[2], PROMPTS[0]], batch_size=2)
    out = tmp_path / "out.jsonl"
    res = invoke("generate", run, "--file", src, "--out", out, "--max-tokens", 12, "--batch-size", 2,
                 "--backend", backend, "--no-progress")
    assert res.exit_code == 0, res.output
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["input"] for g in got] == rows and [g["index"] for g in got] == [0, 1, 2, 3]
    assert [g["output"] for g in got] == want
    res = invoke("generate", run, "--file", src, "--max-tokens", 12, "--batch-size", 2, "--backend", backend, "--no-progress")
    assert res.exit_code == 0 and [json.loads(line)["output"] for line in res.stdout.splitlines()] == want


def test_base_is_the_base_model_and_differs_from_tuned(trained, tiny_model_dir):
    backend, run = trained
    base, _ = direct(run, backend, PROMPTS, adapter=False)
    tuned, _ = direct(run, backend, PROMPTS)
    assert base != tuned
    res = invoke("generate", run, *PROMPTS, "--base", "--max-tokens", 12, "--backend", backend)
    assert res.exit_code == 0, res.output
    assert res.stdout == "".join(f"> {p}\n{t}\n\n" for p, t in zip(PROMPTS, base))
    # a model folder: no adapter, the tokenizer's chat template (the run's template too: same prompt)
    res = invoke("generate", tiny_model_dir, PROMPTS[0], "--max-tokens", 12, "--backend", backend)
    assert res.exit_code == 0 and res.stdout == base[0] + "\n", res.output


@pytest.mark.parametrize("args, words", [
    (["{tmp}/nope", "hi"], ["neither a run directory", "model folder"]),
    (["{run}"], ["give prompts on the command line or --file"]),
    (["{run}", "hi", "--file", "{tmp}/p.jsonl"], ["one of the two"]),
    (["{run}", "--file", "{tmp}/bad.jsonl"], ["bad.jsonl:2: not valid JSON"]),
    (["{run}", "--file", "{tmp}/fields.jsonl"], ["fields.jsonl: row 1", "neither \"prompt\"", "has: question"]),
    (["{run}", "--file", "{tmp}/missing.jsonl"], ["missing.jsonl: file not found"]),
    (["{run}", "hi", "--adapter", "{tmp}/nope"], ["--adapter", "no such folder"]),
    (["{model}", "hi", "--adapter", "best"], ["is a model folder, not a run directory"]),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, tiny_model_dir, args, words):
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("")  # enough for a run directory; the recipe comes next
    (run / "recipe.resolved.toml").write_text(TINY_RECIPE_HEAD.format(model=tiny_model_dir).replace("train.jsonl", "-"))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    write_jsonl(tmp_path / "fields.jsonl", [{"question": "a"}])
    write_jsonl(tmp_path / "p.jsonl", ["hi"])
    fill = {"tmp": tmp_path, "run": run, "model": tiny_model_dir}
    args = [a.format(**fill) for a in args]
    extra = ["--base"] if args[0] == str(run) and "--adapter" not in args else []
    res = invoke("generate", *args, *extra, "--backend", "torch", "--max-tokens", 2)
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in res.output
    assert len([line for line in lines if line.startswith("error")]) == 1
    for w in words:
        assert w in res.output


def test_rows_of_every_format_give_the_training_prefix(tiny_tokenizer, tiny_recipe):
    """A record of the run's format (response left out or not) is the prefix training saw; a
    bare string and {"prompt": ...} are the user message; a text run continues the text."""
    from mlxtune.data.records import encode_prompt
    from mlxtune.errors import MlxtuneError
    from mlxtune.evaluation.chat import row_prompt, user_prompt

    def cfg(*sets):
        return load_recipe(tiny_recipe(), list(sets)).data

    def same(a, b):
        return a.tolist() == b.tolist()

    pc = cfg("data.system_prompt='say yes'")
    assert same(row_prompt("say hello", pc, tiny_tokenizer, "r"), encode_prompt(TINY_RECORDS[-1], pc, tiny_tokenizer))
    assert same(row_prompt({"prompt": "say hello"}, pc, tiny_tokenizer, "r"), user_prompt("say hello", pc, tiny_tokenizer))
    assert tiny_tokenizer.decode(user_prompt("say hello", pc, tiny_tokenizer)) == "<|system|> say yes </s> <|user|> say hello </s> <|assistant|>"
    al = cfg("data.format='alpaca'", "data.template='alpaca'")
    rec = {"instruction": "say hello", "input": "please", "output": "hello world"}
    want = encode_prompt(rec, al, tiny_tokenizer)
    assert same(row_prompt({k: v for k, v in rec.items() if k != "output"}, al, tiny_tokenizer, "r"), want)
    ch = cfg("data.format='chat'")
    msgs = [{"role": "user", "content": "say hello"}]
    assert same(row_prompt({"messages": msgs}, ch, tiny_tokenizer, "r"), user_prompt("say hello", ch, tiny_tokenizer))
    tx = cfg("data.format='text'", "data.loss_on='full'")
    assert tiny_tokenizer.decode(row_prompt({"text": "one two"}, tx, tiny_tokenizer, "r")) == "<s> one two"
    for bad, words in [([1, 2], "expected a string or a JSON object"), ({"instruction": ""}, "has: instruction"),
                       ({"messages": "hi"}, "'messages' must be a list")]:
        with pytest.raises(MlxtuneError, match="row 7: ") as e:
            row_prompt(bad, ch if "messages" in bad else al, tiny_tokenizer, "f.jsonl: row 7")
        assert words in str(e.value)


class ScriptedBackend:
    """Generates a fixed token sequence, calling should_stop after each token as backends do."""

    def __init__(self, ids):
        self.ids = ids

    def generate(self, prompts, max_tokens, *, should_stop=None, **_):
        out = []
        for tok in self.ids[:max_tokens]:
            out.append(tok)
            if should_stop is not None and should_stop(out):
                break
        return [out]


def test_stream_never_shows_a_stop_string(tiny_tokenizer):
    from mlxtune.evaluation.chat import stream_one
    from mlxtune.evaluation.generation import GenSettings

    ids = tiny_tokenizer("one two three four five", add_special_tokens=False)["input_ids"]
    for stop, want in [(("three",), "one two "), (("four five six",), "one two three four five"), ((), "one two three four five")]:
        pieces: list[str] = []
        text = stream_one(ScriptedBackend(ids), tiny_tokenizer, ids[:1], GenSettings(stop=stop), pieces.append)
        assert text == "".join(pieces) == want
        assert all("thr" not in p for p in pieces) if stop == ("three",) else len(pieces) >= 2
