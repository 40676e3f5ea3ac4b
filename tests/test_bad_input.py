"""The bad-input suite: malformed recipes, `--set` values, data files, model folders, run
directories and command lines, each run through the real command line. Every case must end in a
non-zero exit with exactly one `error: ` line (click's own usage errors print `Error: `) that names
the file or key and a word of the fix, and never in a traceback or a silently accepted recipe.

Most cases fail before a model loads; the model-folder cases use copies of the tiny random Llama
of conftest, corrupted one file at a time."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Callable

import pytest
from click.testing import CliRunner

from conftest import TINY_RECIPE_HEAD, TINY_RECORDS, write_jsonl
from mlxtune.cli.main import cli

BASE = TINY_RECIPE_HEAD + '''
[train]
steps = 2
lr = 1e-2
micro_batch = 4

[eval]
before = false

[output]
dir = "{runs}"
name = "bad"
'''


class Env:
    """A tmp folder with a valid recipe (r.toml), its data (train.jsonl, 36 rows) and the tiny
    model; a case breaks one thing and returns the command line."""

    def __init__(self, tmp: Path, model: Path):
        self.tmp, self.model = tmp, model
        write_jsonl(tmp / "train.jsonl", TINY_RECORDS * 3)
        self.recipe = self.write("r.toml", BASE.format(model=model, runs=tmp / "runs"))

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path

    def recipe_text(self, extra: str) -> Path:
        return self.write("r.toml", self.recipe.read_text() + extra)

    # the commands, on r.toml with --set overrides
    def validate(self, *sets: str) -> list:
        return ["validate", self.recipe, *_sets(sets)]

    def run(self, *sets: str, flags: tuple[str, ...] = ()) -> list:
        return ["run", self.recipe, "--backend", "torch", "--no-progress", *flags, *_sets(sets)]

    def show(self, *sets: str) -> list:
        return ["data", "show", self.recipe, *_sets(sets)]

    def data(self, name: str, content: str | bytes, *sets: str, cmd: str = "show") -> list:
        self.write(name, content)
        return getattr(self, cmd)(f"data.train={name}", *sets)

    def model_copy(self, change: Callable[[Path], object]) -> str:
        """A copy of the tiny model with ``change`` applied to it."""
        folder = self.tmp / "model"
        shutil.copytree(self.model, folder)
        change(folder)
        return f"model.path={folder}"

    def run_dir(self, *files: str) -> Path:
        """runs/bad with the given files (metrics.jsonl gets a start event)."""
        path = self.tmp / "runs" / "bad"
        path.mkdir(parents=True, exist_ok=True)
        for f in files:
            self.write(str((path / f).relative_to(self.tmp)), '{"event": "start", "step": 0}\n')
        return path


def _sets(sets: tuple[str, ...]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def _parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)


def _rm(*names: str) -> Callable[[Path], None]:
    return lambda d: [(d / n).unlink() for n in names]


def _put(name: str, content: str | bytes) -> Callable[[Path], None]:
    def change(d: Path) -> None:
        (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return change


def _config(**changes: object) -> Callable[[Path], None]:
    def change(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(changes)
        for k in [k for k, v in changes.items() if v is None]:
            del cfg[k]
        (d / "config.json").write_text(json.dumps(cfg))
    return change


def _truncate(d: Path) -> None:
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])


def _bad_header(d: Path) -> None:
    w = d / "model.safetensors"
    w.write_bytes(struct.pack("<Q", 20) + b'{"not": json at all' + w.read_bytes()[28:])


def _sharded(d: Path) -> None:
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors",
                                            "model.norm.weight": "model-00001-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


NOT_UTF8 = b'{"prompt": "caf\xe9", "completion": "ok"}\n'
CSV_OK = "prompt,completion\n" + "".join(f"{r['prompt']},{r['completion']}\n" for r in TINY_RECORDS * 3)
P = pytest.param

CASES = [
    # ---- the recipe file
    P(lambda e: ["validate", e.write("r.toml", b"[train]\nlr = 1e-4\n# caf\xe9\n")], ["r.toml", "line 3", "UTF-8"], id="recipe-not-utf8"),
    P(lambda e: ["validate", e.write("r.toml", "this is not toml\n")], ["r.toml", "TOML syntax error", "line 1"], id="recipe-not-toml"),
    P(lambda e: ["validate", e.tmp / "nope.toml"], ["nope.toml", "recipe file not found", ".toml recipe"], id="recipe-missing"),
    P(lambda e: ["validate", e.tmp], ["is a directory"], id="recipe-is-a-folder"),
    P(lambda e: ["validate", e.write("r.toml", "foo = 1\n" + e.recipe.read_text())], ["r.toml", "'foo'", "allowed top-level keys"],
      id="recipe-unknown-top-key"),
    P(lambda e: ["validate", e.recipe_text("[trian]\nsteps = 1\n")], ["r.toml", "'trian'", "[train]"], id="recipe-unknown-section"),
    P(lambda e: ["validate", e.write("r.toml", '[data]\ntrain = "t.jsonl"\nformat = "chat"\n[train]\nlrr = 1\n')],
      ["r.toml", "'train.lrr'", "allowed keys"], id="recipe-unknown-key"),
    P(lambda e: ["validate", e.write("r.toml", '[data]\ntrain = "t.jsonl"\nformat = "chat"\n[train]\nlr = "fast"\n')],
      ["r.toml", "'train.lr'", "a number"], id="recipe-wrong-type"),
    P(lambda e: ["validate", e.write("r.toml", 'train = 3\n[data]\ntrain = "t.jsonl"\nformat = "chat"\n')],
      ["r.toml", "'train'", "[train] table"], id="recipe-section-as-value"),
    P(lambda e: ["validate", e.write("r.toml", '[data]\nformat = "chat"\n')], ["r.toml", "data.train"], id="recipe-no-data-train"),
    P(lambda e: ["validate", e.write("r.toml", '[data]\ntrain = "t.jsonl"\nformat = "chat"\n[train]\nlr = "x"\nsteps = -1\n[adapter]\nrank = "r"\n')],
      ["r.toml", "'train.lr'", "'adapter.rank'", "an integer"], id="recipe-collects-all-errors"),
    P(lambda e: e.validate("data.format=sharegpt"), ["'data.format'", "prompt_completion"], id="recipe-unknown-format"),
    P(lambda e: e.validate("backend=jax"), ["'backend'", "torch"], id="recipe-unknown-backend"),
    P(lambda e: e.validate("data.format=text"), ["data.loss_on", "full"], id="recipe-text-needs-full-loss"),
    P(lambda e: e.validate('train.micro_batch="auto"'), ["train.effective_batch"], id="recipe-auto-without-effective-batch"),
    P(lambda e: e.validate('train.memory_budget="lots"'), ["train.memory_budget", "16GB"], id="recipe-bad-memory-budget"),
    # ---- numbers: non-finite, negative, zero, out of range
    P(lambda e: e.validate("train.lr=nan"), ["'train.lr'", "finite"], id="lr-nan"),
    P(lambda e: e.validate("train.lr=inf"), ["'train.lr'", "finite"], id="lr-inf"),
    P(lambda e: e.validate("train.lr=-1e-4"), ["train.lr", "> 0"], id="lr-negative"),
    P(lambda e: e.validate("train.lr=0"), ["train.lr", "> 0"], id="lr-zero"),
    P(lambda e: e.validate("train.steps=0", "train.epochs=nan"), ["'train.epochs'", "finite"], id="epochs-nan"),
    P(lambda e: e.validate("train.steps=0", "train.epochs=inf"), ["'train.epochs'", "finite"], id="epochs-inf"),
    P(lambda e: e.validate("train.steps=0", "train.epochs=-1"), ["train.epochs", ">= 0"], id="epochs-negative"),
    P(lambda e: e.validate("train.steps=-3"), ["train.steps", ">= 0"], id="steps-negative"),
    P(lambda e: e.validate("adapter.rank=0"), ["adapter.rank", ">= 1"], id="rank-zero"),
    P(lambda e: e.validate("adapter.rank=-4"), ["adapter.rank", ">= 1"], id="rank-negative"),
    P(lambda e: e.validate("adapter.alpha=nan"), ["'adapter.alpha'", "finite"], id="alpha-nan"),
    P(lambda e: e.validate("adapter.alpha=0"), ["adapter.alpha", "> 0"], id="alpha-zero"),
    P(lambda e: e.validate("adapter.alpha=-8"), ["adapter.alpha", "> 0"], id="alpha-negative"),
    P(lambda e: e.validate("adapter.dropout=1.0"), ["adapter.dropout", "[0, 1)"], id="dropout-one"),
    P(lambda e: e.validate("adapter.dropout=-0.1"), ["adapter.dropout", "[0, 1)"], id="dropout-negative"),
    P(lambda e: e.validate("data.max_seq_len=0"), ["data.max_seq_len", ">= 8"], id="max-seq-len-zero"),
    P(lambda e: e.validate("train.micro_batch=0"), ["train.micro_batch", ">= 1"], id="micro-batch-zero"),
    P(lambda e: e.validate("train.grad_accum=-1"), ["train.grad_accum", ">= 1"], id="grad-accum-negative"),
    P(lambda e: e.validate("train.eval_every=-1"), ["train.eval_every", ">= 0"], id="eval-every-negative"),
    P(lambda e: e.validate("train.warmup_steps=-2"), ["train.warmup_steps", ">= 0"], id="warmup-steps-negative"),
    P(lambda e: e.validate("train.warmup_ratio=1.5"), ["train.warmup_ratio", "[0, 1)"], id="warmup-ratio-over-one"),
    P(lambda e: e.validate("train.weight_decay=-0.1"), ["train.weight_decay", ">= 0"], id="weight-decay-negative"),
    P(lambda e: e.validate("train.eps=0"), ["train.eps", "> 0"], id="eps-zero"),
    P(lambda e: e.validate("train.grad_clip=inf"), ["'train.grad_clip'", "finite"], id="grad-clip-inf"),
    P(lambda e: e.validate("train.betas=[0.9, 1.5]"), ["train.betas", "[0, 1)"], id="betas-out-of-range"),
    P(lambda e: e.validate("train.seed=-1"), ["train.seed", ">= 0"], id="seed-negative"),
    P(lambda e: e.validate("data.eval_fraction=1.0"), ["data.eval_fraction", "(0, 1)"], id="eval-fraction-one"),
    P(lambda e: e.validate("eval.temperature=nan"), ["'eval.temperature'", "finite"], id="temperature-nan"),
    P(lambda e: e.validate("eval.sandbox_timeout=0"), ["eval.sandbox_timeout", "> 0"], id="sandbox-timeout-zero"),
    P(lambda e: e.validate("eval.batch_size=0"), ["eval.batch_size", ">= 1"], id="eval-batch-size-zero"),
    P(lambda e: e.validate("model.quantize_group_size=16"), ["model.quantize_group_size", "64"], id="group-size-16"),
    # ---- recipes that would train zero steps
    P(lambda e: e.run("train.steps=0", "train.epochs=0.001"), ["train.epochs", "zero steps", "train.steps"], id="epochs-too-small"),
    P(lambda e: e.run("train.steps=0", "train.epochs=1", "train.grad_accum=16"),
      ["27 train examples", "train.micro_batch", "train.grad_accum", "zero steps"], id="data-smaller-than-one-step"),
    # ---- --set
    P(lambda e: e.validate("train.lr"), ["--set", "section.key=value"], id="set-no-equals"),
    P(lambda e: e.validate("=3"), ["--set", "section.key=value"], id="set-no-key"),
    P(lambda e: e.validate("train.lrr=1"), ["'train.lrr'", "--set", "allowed keys"], id="set-unknown-key"),
    P(lambda e: e.validate("train.steps=abc"), ["'train.steps'", "an integer"], id="set-wrong-type"),
    P(lambda e: e.validate("train.lr.x=1"), ["--set", "'lr' is a value"], id="set-into-a-value"),
    P(lambda e: e.validate("train=3"), ["'train'", "[train] table"], id="set-section-to-value"),
    P(lambda e: e.validate("adapter.num_virtual_tokens=10"), ["adapter.num_virtual_tokens", "lora", "remove"], id="set-key-of-other-method"),
    # ---- data files
    P(lambda e: e.data("d.jsonl", NOT_UTF8 * 2), ["d.jsonl:1", "UTF-8"], id="jsonl-not-utf8"),
    P(lambda e: e.data("d.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "a",\n'), ["d.jsonl:2", "not valid JSON", "one JSON object"], id="jsonl-bad-line"),
    P(lambda e: e.data("d.jsonl", ""), ["d.jsonl", "empty", "add records"], id="jsonl-empty"),
    P(lambda e: e.data("d.jsonl", '[1, 2]\n'), ["d.jsonl", "record 1", "JSON object"], id="jsonl-row-not-object"),
    P(lambda e: e.data("d.jsonl", '{"prompt": "a", "completion": "b"}\n{"question": "a", "answer": "b"}\n' * 3),
      ["d.jsonl: record 2", "completion", "data.columns"], id="jsonl-missing-field"),
    P(lambda e: e.data("d.json", b'[{"prompt": "caf\xe9"}]'), ["d.json:1", "UTF-8"], id="json-not-utf8"),
    P(lambda e: e.data("d.json", '{"rows": 3}'), ["d.json", "list of records"], id="json-not-a-list"),
    P(lambda e: e.data("d.json", '[{"prompt": "a"'), ["d.json:1", "not valid JSON"], id="json-invalid"),
    P(lambda e: e.data("d.csv", "question,answer\nhello,world\nsay,hello\nsay,yes\n"), ["d.csv: record 1", "prompt", "data.columns"], id="csv-wrong-columns"),
    P(lambda e: e.data("d.csv", b"prompt,completion\ncaf\xe9,ok\n"), ["d.csv", "UTF-8"], id="csv-not-utf8"),
    P(lambda e: e.data("d.csv", ""), ["d.csv", "empty"], id="csv-empty"),
    P(lambda e: e.data("d.parquet", b"PAR1 this is not parquet at all"), ["d.parquet", "Parquet"], id="parquet-corrupt"),
    P(lambda e: (_parquet(e.tmp / "d.parquet", [{"q": "a", "a": "b"}] * 8), e.show("data.train=d.parquet"))[1],
      ["d.parquet: record 1", "prompt", "data.columns"], id="parquet-wrong-columns"),
    P(lambda e: e.show('data.columns={prompt = "question", completion = "answer"}'),
      ["data.columns", "'question'", "fix data.columns"], id="columns-name-missing-column"),
    P(lambda e: e.data("d.csv", CSV_OK, 'data.columns={prompt = "q"}'), ["data.columns", "'q'", "prompt"], id="csv-columns-name-missing-column"),
    P(lambda e: e.show('data.columns={prompt = 3}'), ["'data.columns'", "table of strings"], id="columns-not-strings"),
    P(lambda e: e.data("d.txt", "hello\n"), ["d.txt", ".jsonl"], id="unknown-extension"),
    P(lambda e: e.show("data.train=missing.jsonl"), ["missing.jsonl", "data file not found"], id="data-file-missing"),
    P(lambda e: e.show("data.eval=missing_eval.jsonl"), ["missing_eval.jsonl", "data file not found"], id="eval-file-missing"),
    P(lambda e: e.show("data.max_seq_len=8"), ["data.max_seq_len = 8", "data.overlong"], id="every-row-too-long"),
    P(lambda e: e.data("d.jsonl", '{"prompt": "say hello", "completion": "hello world hello world hello"}\n' * 8,
                       "data.max_seq_len=8", 'data.overlong="drop"'), ["d.jsonl", "no example left", "data.max_seq_len"], id="every-row-dropped"),
    P(lambda e: e.data("d.jsonl", '{"prompt": "a", "completion": "b"}\n'), ["d.jsonl", "too few", "data.eval"], id="too-few-rows-for-eval"),
    P(lambda e: e.data("d.jsonl", '{"messages": [{"role": "bot", "content": "x"}]}\n' * 4, "data.format=chat"),
      ["d.jsonl: record 1", "'messages'", "role"], id="chat-bad-roles"),
    # ---- model folders
    P(lambda e: e.show(f"model.path={e.tmp / 'no_model'}"), ["no_model", "does not exist"], id="model-folder-missing"),
    P(lambda e: e.show(f"model.path={e.recipe}"), ["r.toml", "not a folder"], id="model-is-a-file"),
    P(lambda e: e.show(e.model_copy(_rm("config.json"))), ["model", "no config.json"], id="config-missing"),
    P(lambda e: e.show(e.model_copy(_put("config.json", "{not json"))), ["config.json", "not valid JSON", "re-download"], id="config-not-json"),
    P(lambda e: e.show(e.model_copy(_put("config.json", b'{"model_type": "llama\xff"}'))), ["config.json", "UTF-8", "re-download"], id="config-not-utf8"),
    P(lambda e: e.show(e.model_copy(_put("config.json", "[1, 2]"))), ["config.json", "JSON object", "re-download"], id="config-not-object"),
    P(lambda e: e.run(e.model_copy(_config(num_hidden_layers=None))), ["config.json", "num_hidden_layers", "re-download"], id="config-no-num-layers"),
    P(lambda e: e.run(e.model_copy(_config(num_hidden_layers="two"))), ["config.json", "num_hidden_layers", "re-download"], id="config-num-layers-not-int"),
    P(lambda e: e.run(e.model_copy(_rm("model.safetensors"))), ["model", "no weights", "safetensors"], id="weights-missing"),
    P(lambda e: e.run(e.model_copy(_truncate)), ["model.safetensors", "truncated", "re-download"], id="weights-truncated"),
    P(lambda e: e.run(e.model_copy(_bad_header)), ["model.safetensors", "not a valid safetensors", "re-download"], id="weights-bad-header"),
    P(lambda e: e.run(e.model_copy(_put("model.safetensors", b"\x00" * 4))), ["model.safetensors", "re-download"], id="weights-tiny-file"),
    P(lambda e: e.run(e.model_copy(_sharded)), ["model-00002-of-00002.safetensors", "missing", "re-download"], id="weights-shard-missing"),
    P(lambda e: e.show(e.model_copy(_rm("tokenizer.json", "tokenizer_config.json"))), ["model", "tokenizer", "re-download"], id="tokenizer-missing"),
    P(lambda e: e.show(e.model_copy(_put("tokenizer.json", "garbage"))), ["model", "tokenizer", "re-download"], id="tokenizer-corrupt"),
    P(lambda e: e.show(e.model_copy(_put("tokenizer.json", '{"a": 1}'))), ["model", "tokenizer", "re-download"], id="tokenizer-wrong-json"),
    P(lambda e: e.show(e.model_copy(_put("tokenizer_config.json", b"\xff\xfe"))), ["model", "tokenizer", "re-download"], id="tokenizer-config-not-utf8"),
    P(lambda e: e.show("model.path=embedded:gpt5"), ["embedded:gpt5", "embedded:smollm2-135m-instruct"], id="unknown-embedded-model"),
    P(lambda e: e.show("model.path=model.Q4_K_M.gguf"), ["GGUF", "Hugging Face"], id="model-gguf"),
    # ---- run directories and commands
    P(lambda e: ["eval", e.recipe, "--run", e.tmp], ["holds no run", "mlxtune run"], id="eval-not-a-run"),
    P(lambda e: (e.run_dir("metrics.jsonl"), ["eval", e.recipe])[1], ["no adapter yet", "--resume"], id="eval-run-without-adapters"),
    P(lambda e: (e.run_dir("metrics.jsonl"), ["eval", e.recipe, "--checkpoints", "best"])[1], ["best", "no eval yet"], id="eval-run-without-best"),
    P(lambda e: ["eval", e.recipe, "--adapter", e.tmp / "nope"], ["--adapter", "does not exist"], id="eval-adapter-missing"),
    P(lambda e: ["eval", e.recipe, "--base", "--no-base"], ["--base", "drop"], id="eval-base-and-no-base"),
    P(lambda e: ["eval", e.recipe, "--checkpoints", "newest"], ["--checkpoints", "best"], id="eval-bad-checkpoints-choice"),
    P(lambda e: (e.run_dir(), (e.tmp / "b").mkdir(), ["compare", e.tmp / "runs" / "bad", e.tmp / "b"])[2],
      ["bad", "metrics.jsonl", "run directory"], id="compare-not-runs"),
    P(lambda e: ["compare", e.tmp / "nope", e.tmp / "nope2"], ["nope", "does not exist"], id="compare-missing"),
    P(lambda e: ["compare", e.recipe], ["r.toml", "is a file"], id="compare-a-file"),
    P(lambda e: ["plan", e.recipe, "--config", e.write("c.json", "{bad")], ["c.json", "model config", "--config"], id="plan-config-not-json"),
    P(lambda e: ["plan", e.recipe, "--config", e.write("c.json", '{"model_type": "llama", "hidden_size": 64}')],
      ["config.json", "num_attention_heads"], id="plan-config-incomplete"),
    P(lambda e: ["plan", e.recipe, "--config", e.tmp / "none.json"], ["--config", "does not exist"], id="plan-config-missing"),
    P(lambda e: ["plan", e.recipe, "--budget", "lots"], ["--budget", "16GB"], id="plan-bad-budget"),
    P(lambda e: ["plan", e.recipe, "--seq-len", "0"], ["--seq-len", "x>=1"], id="plan-seq-len-zero"),
    P(lambda e: ["data", "show", e.recipe, "--split", "test"], ["--split", "eval"], id="data-show-bad-split"),
    P(lambda e: ["data", "show", e.recipe, "-n", "-1"], ["-n", "x>=0"], id="data-show-negative-count"),
    P(lambda e: ["run", e.recipe, "--backend", "jax"], ["--backend", "torch"], id="run-bad-backend"),
    P(lambda e: ["run", e.recipe, "--overwrite", "--resume"], ["--overwrite", "--resume"], id="run-overwrite-and-resume"),
    P(lambda e: e.run(flags=("--resume",)), ["--resume", "holds no run"], id="resume-without-run"),
    P(lambda e: (e.run_dir("metrics.jsonl", "recipe.resolved.toml"), e.run(flags=("--resume",)))[1],
      ["--resume", "no checkpoint", "--overwrite"], id="resume-without-checkpoint"),
    P(lambda e: (e.run_dir("metrics.jsonl"), e.run())[1], ["already holds a run", "--overwrite"], id="run-dir-taken"),
    P(lambda e: (e.write("afile", "x"), e.run(f"output.dir={e.tmp / 'afile' / 'runs'}"))[1],
      ["output.dir", "afile"], id="output-dir-under-a-file"),
    P(lambda e: (e.tmp.joinpath("ro").mkdir(mode=0o500), e.run(f"output.dir={e.tmp / 'ro' / 'runs'}"))[1],
      ["output.dir", "ro", "not writable"], id="output-dir-not-writable",
      marks=pytest.mark.skipif(not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() == 0,
                               reason="root may write anywhere")),
    P(lambda e: ["validate", e.recipe, "--frobnicate"], ["--frobnicate"], id="unknown-option"),
    P(lambda e: ["trian", e.recipe], ["trian"], id="unknown-command"),
]


@pytest.mark.parametrize("setup, words", CASES)
def test_bad_input_is_one_clean_error(setup, words, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    args = setup(Env(tmp_path, tiny_model_dir))
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code != 0, res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.lower().startswith("error: ")]
    assert len(errors) == 1, res.output
    for w in words:
        assert w in errors[0], (w, errors[0])


def test_the_suite_is_large_enough():
    assert len(CASES) >= 60
