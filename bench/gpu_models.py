"""Random-weight models and synthetic chat data for ``bench/gpu_check.py``: nothing downloaded.

Each model is the architecture of a config bundled with mlxtune (``mlxtune/model_configs/``),
with random weights (the speed and memory of a step do not depend on the values), saved as a
Hugging Face folder with a word-level tokenizer built on the fly (``w0 w1 ...``: one word is one
token, so a record's length in tokens is known exactly) and a chat template. ``tiny=True`` keeps
each architecture (model_type, tying, biases, rope) at a width a CPU trains in a second.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "mlxtune" / "model_configs"

# name -> (bundled config, blocks kept: None = all). The 7B keeps 4 blocks: its per-block cost
# and its full vocabulary at a size that builds in seconds.
MODELS = {
    "llama-3.2-1b": ("meta-llama--Llama-3.2-1B-Instruct.json", None),
    "qwen2.5-coder-1.5b": ("Qwen--Qwen2.5-Coder-1.5B-Instruct.json", None),
    "qwen2.5-7b-4l": ("Qwen--Qwen2.5-7B-Instruct.json", 4),
}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=512)
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
# tokens the template adds to one prompt/completion record as mlxtune renders it (no BOS):
# <|user|> </s> <|assistant|> </s>
TEMPLATE_TOKENS = 4


def model_config(name: str, tiny: bool) -> dict[str, Any]:
    """The bundled config.json of ``name``, blocks cut as listed, shrunk to TINY when ``tiny``."""
    file, layers = MODELS[name]
    cfg = json.loads((CONFIGS / file).read_text())
    if layers:
        cfg["num_hidden_layers"] = layers
    if tiny:
        cfg.update(TINY)
        cfg["max_position_embeddings"] = 4096
        cfg.pop("rope_scaling", None)  # llama3 rope scaling: a long-context detail, not a tiny model's
    return cfg


def word_count(cfg: dict[str, Any]) -> int:
    """Words of the tokenizer: ids stay below the model's vocabulary."""
    return min(int(cfg["vocab_size"]), 4096) - len(SPECIALS)


def build_tokenizer(path: Path, words: int | list[str]):
    """A word-level tokenizer (the specials, then ``words``: a list, or ``w0 .. w{n-1}``) with the
    chat template, BOS added by default, saved to ``path``. The tests' tiny tokenizer is this one."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    names = words if isinstance(words, list) else [f"w{i}" for i in range(words)]
    vocab = {t: i for i, t in enumerate(SPECIALS + names)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=SPECIALS[4:])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def build_model(name: str, root: Path, tiny: bool, device: str) -> Path:
    """``root/name``: the config, random bf16 weights (float32 when tiny) and the tokenizer;
    built once (a folder with config.json and weights is reused)."""
    path = root / name
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return path
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = model_config(name, tiny)
    path.mkdir(parents=True, exist_ok=True)
    build_tokenizer(path, word_count(cfg))
    config = AutoConfig.for_model(**cfg)
    dtype = torch.float32 if tiny else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):  # initialised on the GPU: seconds instead of minutes for 1-2B weights
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return path


def records(n: int, seq_len: int, words: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` prompt/completion records of exactly ``seq_len`` tokens in the chat template: a
    random prompt, then a completion (half the tokens) that repeats one short phrase, so the loss
    falls within a few steps."""
    import random

    rng = random.Random(seed)
    body = seq_len - TEMPLATE_TOKENS
    reply = body // 2
    phrase = [f"w{i}" for i in range(1, 9)]
    out = []
    for _ in range(n):
        prompt = " ".join(f"w{rng.randrange(10, words)}" for _ in range(body - reply))
        out.append({"prompt": prompt, "completion": " ".join(phrase[i % len(phrase)] for i in range(reply))})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
