"""Scoring an adapter (or the base model) on the eval split: losses plus generation metrics.

One function, :func:`score`, is used by the training loop at every eval and by `mlxtune eval`
on any checkpoint, so a BLEU or a pass@1 in ``metrics.jsonl`` and in the checkpoint table are
computed the same way; :func:`evaluate` is its loss part (the loop's eval when the recipe asks
for no generation metric). Generation prompts come from
:func:`mlxtune.data.records.encode_prompt`, the prefix the model was trained on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mlxtune.data.batching import Batch
from mlxtune.data.records import encode_prompt, record_to_messages
from mlxtune.errors import MlxtuneError
from mlxtune.evaluation.metrics import bleu, cefr_corpus, cefr_score, chrf, mean_pass_at_k, perplexity, token_weighted_loss
from mlxtune.recipe.schema import Recipe

if TYPE_CHECKING:
    from backends import Backend

    from mlxtune.evaluation.generation import Progress

PPL_CAP = 50.0  # perplexities are exp(min(loss, PPL_CAP)): a diverged eval stays a finite number


def evaluate(backend: Backend, batches: list[Batch], adapter: bool = True) -> dict[str, float]:
    """Token-weighted loss over the whole eval split, response-only and full text."""
    parts: dict[str, list[tuple[float, int]]] = {"response": [], "full": []}
    for b in batches:
        out = backend.eval_step(b.tokens, {"response": b.mask, "full": b.full_mask}, adapter=adapter)
        parts["response"].append((out["response"], int(b.mask.sum())))
        parts["full"].append((out["full"], int(b.full_mask.sum())))
    tokens = {k: sum(n for _, n in v) for k, v in parts.items()}
    loss, loss_full = (token_weighted_loss(parts[k]) if tokens[k] else 0.0 for k in ("response", "full"))
    return {
        "loss": loss, "loss_full": loss_full, "tokens": tokens["response"], "tokens_full": tokens["full"],
        "ppl": perplexity(min(loss, PPL_CAP)), "ppl_full": perplexity(min(loss_full, PPL_CAP)),
    }


def reference(rec: dict[str, Any], recipe: Recipe) -> str:
    """The record's reference response (the text the model was trained to produce)."""
    return record_to_messages(rec, recipe.data)[-1]["content"]


def generation_records(records: list[dict[str, Any]], recipe: Recipe) -> list[dict[str, Any]]:
    n = recipe.eval.generate_examples
    return records[:n] if n else list(records)


def generate_outputs(backend: Backend, tokenizer: Any, records: list[dict[str, Any]], recipe: Recipe,
                     adapter: bool, progress: Progress | None = None) -> list[list[str]]:
    """``eval.samples`` completions per record (sample s uses seed ``eval.seed + s``), each
    generation reported to ``progress`` when given."""
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


def side_by_side(backend: Backend, tokenizer: Any, records: list[dict[str, Any]], recipe: Recipe) -> list[dict[str, Any]]:
    """The first ``eval.show_examples`` records generated greedily by the base model and by the
    adapter, with the user's message and the reference: what fine-tuning changed, in words."""
    from mlxtune.evaluation.generation import GenSettings, generate_texts

    cfg = recipe.eval
    recs = records[: cfg.show_examples]
    prompts = [encode_prompt(r, recipe.data, tokenizer) for r in recs]
    settings = GenSettings(max_tokens=cfg.max_new_tokens, temperature=0.0, batch_size=cfg.gen_batch_size, stop=tuple(cfg.stop))
    base, tuned = (generate_texts(backend, tokenizer, prompts, settings, adapter=on) for on in (False, True))
    rows = []
    for i, (rec, b, t) in enumerate(zip(recs, base, tuned)):
        msgs = record_to_messages(rec, recipe.data)
        user = next(m["content"] for m in reversed(msgs[:-1]) if m["role"] == "user")
        rows.append({"index": i, "prompt": user, "reference": msgs[-1]["content"], "base": b, "tuned": t})
    return rows


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
    """Generation metrics of ``outputs`` (one list of samples per record) and one row per record;
    ``progress`` prints the sandbox's progress (pass@k) on stderr."""
    cfg = recipe.eval
    result: dict[str, Any] = {}
    rows = [{"index": i, "outputs": outs} for i, outs in enumerate(outputs)]
    firsts = [o[0] for o in outputs]
    if "bleu" in cfg.metrics or "chrf" in cfg.metrics:
        refs = [reference(r, recipe) for r in records]
        for row, ref in zip(rows, refs):
            row["reference"] = ref
        if "bleu" in cfg.metrics:
            result.update(bleu(firsts, refs))
        if "chrf" in cfg.metrics:
            result.update(chrf(firsts, refs))
    if "pass@k" in cfg.metrics:
        from mlxtune.evaluation.sandbox import run_programs

        outcomes = run_programs(_code_programs(records, outputs), timeout=cfg.sandbox_timeout,
                                memory_mb=cfg.sandbox_memory_mb, progress=progress)
        counts = []
        for i, row in enumerate(rows):
            mine = outcomes[i * cfg.samples:(i + 1) * cfg.samples]
            # network: which protection the sandbox had in force ("namespace" or "audit hook")
            row["outcomes"] = [{"status": o.status, "reason": o.reason, "network": o.network} for o in mine]
            counts.append((len(mine), sum(o.status == "pass" for o in mine)))
        for k in cfg.pass_k:
            result[f"pass@{k}"] = mean_pass_at_k(counts, k)
        result["solved"] = f"{sum(c > 0 for _, c in counts)}/{len(counts)}"  # as seed 003's table counts them
    if "cefr" in cfg.metrics:
        items = [(r["level"], list(r["words"]), out) for r, out in zip(records, firsts)]
        for row, item in zip(rows, items):
            row["cefr"] = cefr_score(*item)
        corpus = cefr_corpus(items)
        result["cefr"] = corpus["cefr"]
        result["cefr_word_usage"] = corpus["word_usage"]
        result["cefr_level_ok"] = corpus["level_ok"]
    if result:
        result["generated"] = len(records)
    return result, rows


def score(backend: Backend, tokenizer: Any, eval_set: list[Batch], records: list[dict[str, Any]], recipe: Recipe,
          adapter: bool = True, progress: Progress | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Losses on the whole eval split (both masks) and the recipe's generation metrics, with one
    row per generated record (``RunDir.write_generations`` keeps them). With ``progress``, the
    generation reports to it and the code sandbox prints its progress."""
    ev: dict[str, Any] = evaluate(backend, eval_set, adapter=adapter) if eval_set else {}
    rows: list[dict[str, Any]] = []
    if recipe.eval.metrics and records:
        recs = generation_records(records, recipe)
        outputs = generate_outputs(backend, tokenizer, recs, recipe, adapter, progress)
        gen, rows = score_outputs(recs, outputs, recipe, progress is not None)
        ev.update(gen)
    return ev, rows
