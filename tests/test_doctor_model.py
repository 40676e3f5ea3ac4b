"""`mlxtune doctor --model` (issue 15): per-backend log-probabilities on a fixed multilingual text,
their parity, greedy continuations, the chat template's end-of-turn token against the stop
tokens, the pad token and the default recipe's plan."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("mlx_lm")

from mlxtune.cli.doctor import doctor_cmd  # noqa: E402
from mlxtune.system.model_check import check_model  # noqa: E402


def test_doctor_model_on_tiny_model(tiny_model_dir):
    r = check_model(str(tiny_model_dir), ["torch", "mlx"])
    assert set(r["backends"]) == {"torch", "mlx"} and all("logprobs" in f for f in r["backends"].values())
    (p,) = r["parity"]
    assert p["max_abs_logprob_diff"] < 1e-4 and p["greedy_equal"]
    assert r["chat"] == {"eos": "</s>", "stop_tokens": ["</s>"], "pad": "<pad>", "pad_is_eos": False, "template": True,
                         "end_of_turn": "</s>", "ends_with_stop": True}
    assert all(plan["fits"] for plan in r["plans"].values())


def test_doctor_model_warns_when_the_template_never_stops(tiny_model_dir, tmp_path):
    """A template that closes the assistant turn with a token the model does not stop on."""
    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    template = cfg.get("chat_template") or (model / "chat_template.jinja").read_text()
    template = template.replace("</s>", "<|system|>")
    if "chat_template" in cfg:
        cfg["chat_template"] = template
        (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    else:
        (model / "chat_template.jinja").write_text(template)
    out = CliRunner().invoke(doctor_cmd, ["--model", str(model)])
    assert out.exit_code == 0, out.output
    assert "parity mlx vs torch" in out.output and "greedy continuations equal" in out.output
    assert "WARNING" in out.output and "<|system|>" in out.output and "not among the stop tokens" in out.output


@pytest.mark.slow
def test_doctor_model_embedded(embedded_model_dir):
    out = CliRunner().invoke(doctor_cmd, ["--model", "embedded:smollm2-135m-instruct"])
    assert out.exit_code == 0, out.output
    print(out.output)
    assert "parity mlx vs torch" in out.output and "greedy continuations equal" in out.output
    assert "an assistant turn ends with <|im_end|>, a stop token" in out.output
    assert "same as eos" in out.output  # SmolLM2's pad token is its <|im_end|>
