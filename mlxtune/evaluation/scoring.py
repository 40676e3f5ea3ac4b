"""Scoring an adapter (or the base model) on the eval split: losses plus generation metrics.

One function, :func:`score`, is used by the training loop at every eval and by `mlxtune eval`
on any checkpoint, so a BLEU or a pass@1 in ``metrics.jsonl`` and in the checkpoint table are
computed the same way; :func:`evaluate` is its loss part (the loop's eval when the recipe asks
for no generation metric). Generation prompts come from
:func:`mlxtune.data.records.encode_prompt`, the prefix the model was trained on.

Under a launcher (a :class:`World`: ``mlxtune.training.dist.Dist``) the eval is sharded: eval
batch i is scored by rank i % size, each generation batch j (as one process cuts them) is run by
rank j % size; the per-batch loss sums and the texts are all-summed / gathered, so every rank
ends with one process's numbers and texts, and rank 0 computes the generation metrics once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from mlxtune.data.batching import Batch
from mlxtune.data.records import encode_prompt, record_to_messages
from mlxtune.errors import MlxtuneError
from mlxtune.evaluation.metrics import bleu, cefr_corpus, cefr_score, chrf, mean_pass_at_k, perplexity, token_weighted_loss
from mlxtune.recipe.schema import Recipe

if TYPE_CHECKING:
    from backends import Backend

    from mlxtune.evaluation.generation import Progress

PPL_CAP = 50.0  # perplexities are exp(min(loss, PPL_CAP)): a diverged eval stays a finite number


class World(Protocol):
    """The processes of a launcher, as the eval needs them (``mlxtune.training.dist.Dist``)."""

    rank: int
    size: int

    def sum(self, values: list[float]) -> list[float]: ...

    def gather_texts(self, mine: Mapping[int, str], n: int) -> list[str]: ...


def _share(world: World | None) -> tuple[int, int]:
    return (world.rank, world.size) if world is not None and world.size > 1 else (0, 1)


def evaluate(backend: Backend, batches: list[Batch], adapter: bool = True, world: World | None = None) -> dict[str, float]:
    """Token-weighted loss over the whole eval split, response-only and full text. With a
    ``world`` of several ranks, batch i is scored by rank i % size and each batch's (NLL sum,
    tokens) is all-summed into its own slot (the other ranks add 0.0), so every rank combines
    the same numbers in the same order as one process: the same loss, bit for bit."""
    rank, size = _share(world)
    sums = [0.0] * (4 * len(batches))
    for i, b in enumerate(batches):
        if i % size == rank:
            out = backend.eval_step(b.tokens, {"response": b.mask, "full": b.full_mask}, adapter=adapter)
            sums[4 * i: 4 * i + 4] = [float(out["response"]), float(b.mask.sum()), float(out["full"]), float(b.full_mask.sum())]
    if size > 1:
        assert world is not None
        sums = world.sum(sums)
    parts: dict[str, list[tuple[float, int]]] = {
        "response": [(sums[4 * i], round(sums[4 * i + 1])) for i in range(len(batches))],
        "full": [(sums[4 * i + 2], round(sums[4 * i + 3])) for i in range(len(batches))],
    }
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
                     adapter: bool, progress: Progress | None = None, world: World | None = None) -> list[list[str]]:
    """``eval.samples`` completions per record (sample s uses seed ``eval.seed + s``), each
    generation reported to ``progress`` when given (under a launcher: this rank's share). With a
    ``world`` of several ranks each runs its share of one process's generation batches and the
    texts are gathered, so every rank gets one process's outputs (greedy and sampled alike: a
    batch's seed and padding are those of the same batch in one process)."""
    from mlxtune.evaluation.generation import GenSettings, generate_texts, generation_batches

    cfg = recipe.eval
    share = _share(world)
    prompts = [encode_prompt(r, recipe.data, tokenizer) for r in records]
    texts: list[list[str]] = []  # per sample, per record
    for s in range(cfg.samples):
        settings = GenSettings(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                               seed=cfg.seed + s, batch_size=cfg.gen_batch_size, stop=tuple(cfg.stop))
        texts.append(generate_texts(backend, tokenizer, prompts, settings, adapter=adapter, progress=progress, share=share))
    n = len(records)
    if share[1] > 1:
        assert world is not None
        mine = [i for chunk in generation_batches(prompts, cfg.gen_batch_size, share) for i in chunk]
        flat = world.gather_texts({s * n + i: texts[s][i] for s in range(cfg.samples) for i in mine}, n * cfg.samples)
        texts = [flat[s * n:(s + 1) * n] for s in range(cfg.samples)]
    return [[t[i] for t in texts] for i in range(n)]


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


def score_once(world: World, records: list[dict[str, Any]], outputs: list[list[str]], recipe: Recipe,
               progress: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """:func:`score_outputs` of the gathered outputs on rank 0 alone (the code sandbox runs once),
    its metrics sent to every rank as JSON (exact floats) so all ranks hold the same eval; the
    rows (for generations/) stay on rank 0. An error on rank 0 is raised on every rank."""
    rows: list[dict[str, Any]] = []
    mine: dict[int, str] = {}
    failure: Exception | None = None
    if world.rank == 0:
        try:
            gen, rows = score_outputs(records, outputs, recipe, progress)
            mine[0] = json.dumps({"metrics": gen})
        except Exception as e:  # the other ranks wait in the gather below: tell them, then raise
            failure = e
            mine[0] = json.dumps({"error": str(e)})
    got = json.loads(world.gather_texts(mine, 1)[0])
    if failure is not None:
        raise failure
    if "error" in got:
        raise MlxtuneError(got["error"])
    return got["metrics"], rows


def score(backend: Backend, tokenizer: Any, eval_set: list[Batch], records: list[dict[str, Any]], recipe: Recipe,
          adapter: bool = True, progress: Progress | None = None,
          world: World | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Losses on the whole eval split (both masks) and the recipe's generation metrics, with one
    row per generated record (``RunDir.write_generations`` keeps them). With ``progress``, the
    generation reports to it and the code sandbox prints its progress. With a ``world`` of
    several ranks the work is sharded (see the module's note); every rank returns the same
    metrics, rank 0 alone the rows."""
    ev: dict[str, Any] = evaluate(backend, eval_set, adapter=adapter, world=world) if eval_set else {}
    rows: list[dict[str, Any]] = []
    if recipe.eval.metrics and records:
        recs = generation_records(records, recipe)
        outputs = generate_outputs(backend, tokenizer, recs, recipe, adapter, progress, world)
        if _share(world)[1] > 1:
            assert world is not None
            gen, rows = score_once(world, recs, outputs, recipe, progress is not None)
        else:
            gen, rows = score_outputs(recs, outputs, recipe, progress is not None)
        ev.update(gen)
    return ev, rows
