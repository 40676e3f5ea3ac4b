"""Scoring an adapter (or the base model) on the eval split: losses plus generation metrics.

One function, :func:`score`, is used by the training loop at every eval and by `mlxtune eval`
on any checkpoint, so a BLEU or a pass@1 in ``metrics.jsonl`` and in the checkpoint table are
computed the same way. Generation prompts come from :func:`mlxtune.data.records.encode_prompt`, the
prefix the model was trained on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlxtune.data.batching import Batch
from mlxtune.data.records import encode_prompt, record_to_messages
from mlxtune.errors import MlxtuneError
from mlxtune.files import write_text_atomic
from mlxtune.recipe.schema import Recipe

if TYPE_CHECKING:
    from backends import Backend

# eval-event key of each `best_metric` name that differs from it
METRIC_KEYS = {"eval_loss": "loss", "eval_loss_full": "loss_full"}


def metric_value(ev: dict[str, Any], name: str) -> float | None:
    v = ev.get(METRIC_KEYS.get(name, name))
    return None if v is None else float(v)


def reference(rec: dict[str, Any], recipe: Recipe) -> str:
    """The record's reference response (the text the model was trained to produce)."""
    return record_to_messages(rec, recipe.data)[-1]["content"]


def generation_records(records: list[dict[str, Any]], recipe: Recipe) -> list[dict[str, Any]]:
    n = recipe.eval.generate_examples
    return records[:n] if n else list(records)


def generate_outputs(backend: Backend, tokenizer: Any, records: list[dict[str, Any]], recipe: Recipe,
                     adapter: bool, progress: bool) -> list[list[str]]:
    """``eval.samples`` completions per record (sample s uses seed ``eval.seed + s``)."""
    from mlxtune.evaluation.generation import GenSettings, generate_texts

    cfg = recipe.eval
    prompts = [encode_prompt(r, recipe.data, tokenizer) for r in records]
    outputs: list[list[str]] = [[] for _ in records]
    for s in range(cfg.samples):
        settings = GenSettings(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                               seed=cfg.seed + s, batch_size=cfg.gen_batch_size, stop=tuple(cfg.stop))
        for out, text in zip(outputs, generate_texts(backend, tokenizer, prompts, settings, adapter=adapter, progress=progress)):
            out.append(text)
    return outputs


def _code_programs(records: list[dict[str, Any]], outputs: list[list[str]]) -> list[str]:
    from mlxtune.evaluation.sandbox import extract_code, humaneval_program

    programs = []
    for i, (rec, outs) in enumerate(zip(records, outputs)):
        missing = [k for k in ("test", "entry_point") if not rec.get(k)]
        if missing:
            raise MlxtuneError(
                f"eval.metrics pass@k: eval record {i + 1} has no {' / '.join(missing)}; code records scored by pass@k "
                'need "test" (code defining check(candidate)) and "entry_point" (the function name)'
            )
        programs += [humaneval_program(rec["problem"], extract_code(o), rec["test"], rec["entry_point"]) for o in outs]
    return programs


def score_outputs(records: list[dict[str, Any]], outputs: list[list[str]], recipe: Recipe,
                  progress: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Generation metrics of ``outputs`` (one list of samples per record) and one row per record."""
    from mlxtune.evaluation import metrics as M

    cfg = recipe.eval
    result: dict[str, Any] = {}
    rows = [{"index": i, "outputs": outs} for i, outs in enumerate(outputs)]
    firsts = [o[0] for o in outputs]
    if "bleu" in cfg.metrics or "chrf" in cfg.metrics:
        refs = [reference(r, recipe) for r in records]
        for row, ref in zip(rows, refs):
            row["reference"] = ref
        if "bleu" in cfg.metrics:
            result.update(M.bleu(firsts, refs))
        if "chrf" in cfg.metrics:
            result.update(M.chrf(firsts, refs))
    if "pass@k" in cfg.metrics:
        from mlxtune.evaluation.sandbox import run_programs

        outcomes = run_programs(_code_programs(records, outputs), timeout=cfg.sandbox_timeout,
                                memory_mb=cfg.sandbox_memory_mb, progress=progress)
        counts = []
        for i, row in enumerate(rows):
            mine = outcomes[i * cfg.samples:(i + 1) * cfg.samples]
            row["outcomes"] = [{"status": o.status, "reason": o.reason} for o in mine]
            counts.append((len(mine), sum(o.status == "pass" for o in mine)))
        for k in cfg.pass_k:
            result[f"pass@{k}"] = M.mean_pass_at_k(counts, k)
        result["solved"] = f"{sum(c > 0 for _, c in counts)}/{len(counts)}"  # as seed 003's table counts them
    if "cefr" in cfg.metrics:
        items = [(r["level"], list(r["words"]), out) for r, out in zip(records, firsts)]
        for row, item in zip(rows, items):
            row["cefr"] = M.cefr_score(*item)
        corpus = M.cefr_corpus(items)
        result["cefr"] = corpus["cefr"]
        result["cefr_word_usage"] = corpus["word_usage"]
        result["cefr_level_ok"] = corpus["level_ok"]
    if result:
        result["generated"] = len(records)
    return result, rows


def score(backend: Backend, tokenizer: Any, eval_set: list[Batch], records: list[dict[str, Any]], recipe: Recipe,
          adapter: bool = True, progress: bool = True) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Losses on the whole eval split (both masks) and the recipe's generation metrics."""
    from mlxtune.training.loop import evaluate

    ev: dict[str, Any] = evaluate(backend, eval_set, adapter=adapter) if eval_set else {}
    rows: list[dict[str, Any]] = []
    if recipe.eval.metrics and records:
        recs = generation_records(records, recipe)
        outputs = generate_outputs(backend, tokenizer, recs, recipe, adapter, progress)
        gen, rows = score_outputs(recs, outputs, recipe, progress)
        ev.update(gen)
    return ev, rows


def write_generations(path: Path, rows: list[dict[str, Any]]) -> None:
    """Every generated output next to its reference and outcome, for reading by hand."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
