"""`mlxtune doctor --model`: the check a user runs on their own model before trusting a comparison.

The model is loaded on every backend that loads here (float32, the default recipe otherwise)
and each reports, for a fixed multilingual text, the log-probability of every next token with
the adapter off: the figure compared across backends and across machines (the same text and
numbers on a Mac and on a CUDA box). Besides: the greedy continuation of the text's start, the
chat template's end-of-turn token and whether the model stops on it (the EOS ids of
``generation_config.json`` / the tokenizer), the pad token, whether the mlx backend takes the
model (and why not), and the memory plan of the default recipe on each backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mlxtune.errors import MlxtuneError

# English, German, French, Turkish, Russian, Chinese, Arabic: one text through every tokenizer
TEXT = ("The quick brown fox jumps over the lazy dog. Der schnelle braune Fuchs springt über den faulen Hund. "
        "Le renard brun rapide saute par-dessus le chien paresseux. Hızlı kahverengi tilki tembel köpeğin "
        "üstünden atlar. Быстрая бурая лиса прыгает через ленивую собаку. 敏捷的棕色狐狸跳过了懒狗。 "
        "الثعلب البني السريع يقفز فوق الكلب الكسول.")
GEN_TOKENS = 16


def _recipe(spec: str, float32: bool) -> Any:
    """The default recipe for the model (in float32 for the parity figures)."""
    from mlxtune.recipe.loading import recipe_from_dict

    model = {"path": spec} | ({"dtype": "float32"} if float32 else {})
    return recipe_from_dict({"model": model, "data": {"train": "train.jsonl", "format": "chat"}})


def chat_findings(tokenizer: Any, model_dir: Path) -> dict[str, Any]:
    """The template's end-of-turn token (the first special token after an assistant reply), the
    ids the model stops on, whether they include it, and the pad token."""
    import json

    stop = set()
    gen_cfg = model_dir / "generation_config.json"
    if gen_cfg.is_file():
        eos = json.loads(gen_cfg.read_text(encoding="utf-8")).get("eos_token_id")
        stop |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        stop.add(tokenizer.eos_token_id)
    out: dict[str, Any] = {"eos": tokenizer.eos_token, "stop_tokens": sorted(tokenizer.convert_ids_to_tokens(sorted(stop))),
                           "pad": tokenizer.pad_token, "pad_is_eos": tokenizer.pad_token is not None and tokenizer.pad_token == tokenizer.eos_token}
    if not getattr(tokenizer, "chat_template", None):
        out.update(template=False, end_of_turn=None, ends_with_stop=False)
        return out
    reply = "Hello there"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": reply}], tokenize=False)
    after = text[text.rfind(reply) + len(reply):]
    specials = sorted(set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {})), key=len, reverse=True)
    hits = [(after.find(s), s) for s in specials if s and s in after]
    end = min(hits)[1] if hits else None
    end_id = tokenizer.convert_tokens_to_ids(end) if end else None
    out.update(template=True, end_of_turn=end, ends_with_stop=end_id in stop)
    return out


def _backend_figures(name: str, model_dir: Path, recipe: Any, ids: np.ndarray) -> dict[str, Any]:
    """Per-token log-probabilities of ``ids`` and the greedy continuation of its first tokens."""
    from mlxtune.training.session import load_backend_with_adapter

    backend = load_backend_with_adapter(name, model_dir, recipe)
    tokens = ids[None, :].astype(np.int32)
    masks = {}
    for t in range(1, tokens.shape[1]):
        m = np.zeros_like(tokens, dtype=bool)
        m[0, t] = True
        masks[str(t)] = m
    nll = backend.eval_step(tokens, masks, adapter=False)
    logprobs = np.array([-nll[str(t)] for t in range(1, tokens.shape[1])], dtype=np.float64)
    gen = backend.generate([ids[:8].astype(np.int32)], GEN_TOKENS, temperature=0.0, adapter=False)[0]
    return {"logprobs": logprobs, "greedy": list(map(int, gen))}


def check_model(spec: str, backends: list[str]) -> dict[str, Any]:
    """The report of ``doctor --model`` as data: per backend its figures (or why it failed), the
    parity of each pair, the chat findings and the memory plans."""
    from mlxtune.models.source import load_tokenizer, read_config, resolve_model
    from mlxtune.planning.planner import plan_recipe
    from mlxtune.training.session import backend_problem

    recipe, default = _recipe(spec, True), _recipe(spec, False)
    model_dir = resolve_model(recipe.model.path, recipe.model.revision, recipe.model.trust_remote_code)
    tokenizer = load_tokenizer(model_dir, recipe.model.trust_remote_code)
    ids = np.array(tokenizer(TEXT, add_special_tokens=False)["input_ids"], dtype=np.int32)
    config = read_config(model_dir)
    report: dict[str, Any] = {"model_dir": str(model_dir), "model_type": config.get("model_type"), "tokens": len(ids),
                              "chat": chat_findings(tokenizer, model_dir), "backends": {}, "plans": {}}
    for name in backends:
        try:
            problem = backend_problem(name, model_dir)
            if problem:
                report["backends"][name] = {"error": f"refused: {problem}"}
                continue
            report["backends"][name] = _backend_figures(name, model_dir, recipe, ids)
        except MlxtuneError as e:
            report["backends"][name] = {"error": str(e)}
        try:
            plan = plan_recipe(default, name, config=config)
            report["plans"][name] = {"fits": plan.fits, "micro_batch": plan.micro_batch, "peak": plan.estimate.total,
                                     "budget": plan.budget, "device": plan.device}
        except MlxtuneError as e:
            report["plans"][name] = {"error": str(e)}
    ok = {n: f for n, f in report["backends"].items() if "logprobs" in f}
    names = sorted(ok)
    report["parity"] = [
        {"pair": f"{a} vs {b}", "max_abs_logprob_diff": float(np.abs(ok[a]["logprobs"] - ok[b]["logprobs"]).max()),
         "mean_nll": (float(-ok[a]["logprobs"].mean()), float(-ok[b]["logprobs"].mean())),
         "greedy_equal": ok[a]["greedy"] == ok[b]["greedy"]}
        for i, a in enumerate(names) for b in names[i + 1:]
    ]
    return report
