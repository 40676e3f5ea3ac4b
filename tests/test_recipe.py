"""Recipe parsing: every kind of bad input is one clear error naming the file, key and fix."""

from pathlib import Path

import pytest

from mlxtune.errors import MlxtuneError
from mlxtune.recipe.loading import load_recipe, parse_override, recipe_from_dict, reference_markdown

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.toml"))
MINIMAL = '[data]\ntrain = "d.jsonl"\nformat = "alpaca"\n'


def write(tmp_path, text):
    p = tmp_path / "r.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_validates(path):
    r = load_recipe(path, planning=True)  # what `mlxtune plan` reads
    assert r.run_name == path.stem
    assert Path(r.resolve_path(r.data.train)).is_file(), "shipped recipes point at shipped data"
    assert load_recipe(path) == r  # every method of the shipped recipes trains (qlora included)


def test_defaults_and_types(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL + "[train]\nlr = 1\n[adapter]\nalpha = 32\nrank = 16\n"))
    assert r.train.lr == 1.0 and isinstance(r.train.lr, float)  # an int where a float is expected is widened
    assert r.train.epochs == 1.0  # neither epochs nor steps: one epoch
    assert r.adapter.scale == 2.0
    assert r.model.path == "embedded:smollm2-135m-instruct"


@pytest.mark.parametrize("text, words", [
    (MINIMAL + "[train]\nlearning_rate = 1e-4\n", ["unknown key 'train.learning_rate'", "allowed keys", "lr"]),
    (MINIMAL + "bogus = 1\n", ["unknown key 'data.bogus'"]),
    (MINIMAL.replace("[data]", "epochs = 3\n[data]"), ["unknown key 'epochs'", "[train]"]),
    (MINIMAL + "[train]\nlr = \"fast\"\n", ["'train.lr' = 'fast' is not a number"]),
    (MINIMAL + "[train]\nmicro_batch = 2.5\n", ["'train.micro_batch'", "not an integer"]),
    (MINIMAL + "[model]\ndtype = \"fp8\"\n", ["'model.dtype'", 'one of "float32", "bfloat16", "float16"']),
    (MINIMAL + "[adapter]\ntarget_modules = \"q_proj\"\n", ["'adapter.target_modules'", "a list of strings"]),
    (MINIMAL + "[train]\nepochs = 2\nsteps = 10\n", ["train.epochs or train.steps, not both"]),
    (MINIMAL + "[train]\nwarmup_steps = 2\nwarmup_ratio = 0.1\n", ["warmup_steps or train.warmup_ratio"]),
    (MINIMAL + "[adapter]\nrank = 0\n", ["adapter.rank must be >= 1"]),
    (MINIMAL + "[adapter]\nlayers = \"some\"\n", ["adapter.layers"]),
    (MINIMAL + "[adapter]\nmethod = \"prefix\"\nrank = 4\nprompt_init = \"text\"\n",
     ["adapter.prompt_init, adapter.rank do not apply", "num_virtual_tokens, prefix_projection, prefix_hidden"]),
    (MINIMAL + "[adapter]\nnum_virtual_tokens = 8\n", ["adapter.num_virtual_tokens does not apply", "rank, alpha"]),
    (MINIMAL + "[adapter]\nmethod = \"prompt\"\nprompt_init = \"text\"\n", ["prompt_init_text"]),
    (MINIMAL + "[adapter]\nmethod = \"prefix\"\nprefix_hidden = 64\n", ["prefix_projection = true"]),
    (MINIMAL + "[adapter]\nmethod = \"prompt\"\n[model]\nquantize_bits = 4\n", ["model.quantize_bits = 4", "full-precision"]),
    (MINIMAL + "[adapter]\nmethod = \"prefix\"\n[train]\ngrad_checkpointing = true\n", ["grad_checkpointing"]),
    ('[data]\nformat = "alpaca"\n', ["missing required key 'data.train'"]),
    ('[data]\ntrain = "d.jsonl"\n', ["missing required key 'data.format'"]),
    ('[data]\ntrain = "d.jsonl"\nformat = "sharegpt"\n', ["'data.format'", "prompt_completion"]),
    ('[data]\ntrain = "d.jsonl"\nformat = "text"\n', ["data.loss_on = \"full\""]),
    (MINIMAL + "template = \"Q: A:\"\n", ["{prompt}"]),
    ("model = 3\n" + MINIMAL, ["'model' must be a [model] table"]),
])
def test_bad_recipes_name_file_key_and_fix(tmp_path, text, words):
    path = write(tmp_path, text)
    with pytest.raises(MlxtuneError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert str(path) in msg
    for w in words:
        assert w in msg


def test_toml_syntax_error_has_line(tmp_path):
    path = write(tmp_path, MINIMAL + "[train]\nlr = = 3\n")
    with pytest.raises(MlxtuneError, match=r"TOML syntax error.*line 5"):
        load_recipe(path)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(MlxtuneError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.toml")


def test_overrides(tmp_path):
    path = write(tmp_path, MINIMAL)
    r = load_recipe(path, ["train.lr=3e-4", "adapter.target_modules=['q_proj']", "model.path=org/model", "train.steps=7"])
    assert r.train.lr == 3e-4 and r.adapter.target_modules == ["q_proj"] and r.model.path == "org/model" and r.train.steps == 7
    with pytest.raises(MlxtuneError, match=r"with --set overrides.*'train.lrr'"):
        load_recipe(path, ["train.lrr=1"])
    with pytest.raises(MlxtuneError, match="expected section.key=value"):
        parse_override("train.lr")


def test_reference_lists_every_key():
    text = reference_markdown()
    for key in ("`lr`", "`target_modules`", "`max_seq_len`", "`best_metric`", "`backend`"):
        assert key in text


def test_to_dict_round_trips():
    r = recipe_from_dict({"data": {"train": "x.jsonl", "format": "chat"}, "train": {"steps": 3}})
    again = recipe_from_dict(r.to_dict())
    assert again == r
