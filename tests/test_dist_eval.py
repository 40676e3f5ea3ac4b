"""Sharded eval under a launcher (issue 16): eval batches and generations split across ranks,
losses all-summed and texts gathered, so every rank gets what one process computes.

The in-process tests simulate the ranks as threads whose ``all_sum`` adds every thread's list
(a barrier on each side), calling the same functions a launched rank calls; one real
``torchrun --nproc-per-node 2`` run is compared with one process. ``pytest -rP`` prints the
differences measured.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from conftest import TINY_RECORDS
from mlxtune.data.batching import Batch
from mlxtune.errors import MlxtuneError
from mlxtune.evaluation import scoring
from mlxtune.evaluation.generation import generation_batches
from mlxtune.recipe.loading import recipe_from_dict
from mlxtune.training.dist import Dist, gather_texts
from test_distributed import TORCHRUN, check, mlxtune, write_recipe


def run_ranks(size: int, fn: Callable[[Dist], Any]) -> list[Any]:
    """``fn(dist)`` on ``size`` threads, thread r holding rank r of a world whose all_sum adds
    the lists all ranks pass (in rank order, in float64 like the backends); fn's results by rank."""
    barrier = threading.Barrier(size, timeout=60)
    slots: list[Any] = [None] * size
    results: list[Any] = [None] * size
    errors: list[BaseException | None] = [None] * size

    def world(rank: int) -> Dist:
        def all_sum(values: list[float]) -> list[float]:
            slots[rank] = np.asarray(values, dtype=np.float64)
            barrier.wait()
            total = sum(slots[1:], slots[0].copy())
            barrier.wait()  # nobody overwrites a slot before all have read them
            return total.tolist()

        return Dist(rank, size, all_sum, "fake")

    def body(rank: int) -> None:
        try:
            results[rank] = fn(world(rank))
        except BaseException as e:  # re-raised in the test's thread
            errors[rank] = e
            barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = next((e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)), None)
    if first is not None or any(errors):
        raise first or errors[0]  # type: ignore[misc]
    return results


# ---------------------------------------------------------------- gathering texts


def test_gather_texts_puts_every_ranks_texts_in_their_places():
    texts = ["héllo wörld", "", "çok güzel 🙂", "a" * 300, "x", "line\nbreak", "ÿ\x00z"]
    for size in (2, 3):
        mine = [{i: t for i, t in enumerate(texts) if i % size == r} for r in range(size)]
        got = run_ranks(size, lambda d: gather_texts(d, mine[d.rank], len(texts)))
        assert got == [texts] * size
    # one rank holding everything, another nothing; and an index nobody holds comes back empty
    assert run_ranks(2, lambda d: d.gather_texts({0: "só", 2: "ok"} if d.main else {}, 4)) == [["só", "", "ok", ""]] * 2
    assert run_ranks(2, lambda d: gather_texts(d, {}, 3)) == [["", "", ""]] * 2
    assert gather_texts(Dist(), {1: "b", 0: "a"}, 3) == ["a", "b", ""]
    with pytest.raises(ValueError, match="outside"):
        run_ranks(2, lambda d: gather_texts(d, {5: "no"}, 2))


# ---------------------------------------------------------------- the eval loss


class FakeEvalBackend:
    """eval_step returns an NLL sum that depends on the batch's tokens and masks (float32, as a
    backend's), and records which batches this rank scored."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def eval_step(self, tokens, masks, adapter=True):
        self.seen.append(int(tokens[0, 0]))
        x = np.sin(tokens.astype(np.float32) * 0.37) + 1.3
        return {k: float(np.float32((x * m).sum(dtype=np.float32))) for k, m in masks.items()}


def eval_set(n: int) -> list[Batch]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        tokens = rng.integers(1, 500, size=(3, 7)).astype(np.int32)
        tokens[0, 0] = i  # the batch's number, for FakeEvalBackend.seen
        full = rng.random((3, 7)) < 0.8
        out.append(Batch(tokens, full & (rng.random((3, 7)) < 0.6), full, 0))
    return out


def test_sharded_eval_loss_is_one_processes_bit_for_bit():
    batches = eval_set(5)
    one = scoring.evaluate(FakeEvalBackend(), batches)
    assert one["tokens"] == sum(int(b.mask.sum()) for b in batches)
    for size in (2, 3, 7):  # 7 ranks: two of them score no batch at all
        backends = [FakeEvalBackend() for _ in range(size)]
        got = run_ranks(size, lambda d: scoring.evaluate(backends[d.rank], batches, world=d))
        assert got == [one] * size  # equal floats, not close ones
        assert [b.seen for b in backends] == [list(range(5))[r::size] for r in range(size)]


# ---------------------------------------------------------------- generation and its metrics


def recipe(**evals: Any):
    raw = {"model": {"path": "unused"}, "data": {"train": "train.jsonl", "format": "prompt_completion"},
           "eval": {"metrics": ["bleu", "chrf"], "gen_batch_size": 2, "max_new_tokens": 6, **evals}}
    return recipe_from_dict(raw)


class FakeGenBackend:
    """generate() whose tokens depend on the batch as a whole (its seed, its width and each
    row's place in it), as padding and per-batch seeds make a real backend's: sharded
    generation matches one process only if every batch is the same batch."""

    def __init__(self, words: list[int]) -> None:
        self.words, self.prompts = words, 0

    def generate(self, prompts, max_tokens, *, temperature, top_p, seed, eos_ids, pad_id, adapter, should_stop):
        self.prompts += len(prompts)
        width = max(len(p) for p in prompts)
        rng = np.random.default_rng([seed, width, int(temperature * 1000)])
        return [[int(w) for w in rng.choice(self.words, size=1 + (row + len(p)) % max_tokens)] for row, p in enumerate(prompts)]


@pytest.mark.parametrize("evals", [{}, {"temperature": 0.8, "samples": 2, "generate_examples": 9}], ids=["greedy", "sampled"])
def test_sharded_generation_and_metrics_are_one_processes(tiny_tokenizer, evals):
    rec = recipe(**evals)
    records = TINY_RECORDS
    words = [i for i in tiny_tokenizer(" ".join(r["completion"] for r in records), add_special_tokens=False)["input_ids"]]
    batches = eval_set(3)
    one_backend = FakeGenBackend(words)
    one_backend.eval_step = FakeEvalBackend().eval_step
    one, one_rows = scoring.score(one_backend, tiny_tokenizer, batches, records, rec)
    assert one["generated"] == len(scoring.generation_records(records, rec)) and "bleu" in one and "chrf" in one

    def rank(d: Dist):
        b = FakeGenBackend(words)
        b.eval_step = FakeEvalBackend().eval_step
        ev, rows = scoring.score(b, tiny_tokenizer, batches, records, rec, world=d)
        return ev, rows, b.prompts

    got = run_ranks(2, rank)
    assert [g[0] for g in got] == [one, one]  # losses and metrics, on both ranks
    assert got[0][1] == one_rows and got[1][1] == []  # rank 0 holds the rows generations/ gets
    n = one["generated"] * rec.eval.samples
    assert got[0][2] + got[1][2] == n and got[0][2] > 0 and got[1][2] > 0  # each generated its share
    # and the shares are the single process's batches, dealt out in turn
    prompts = [[0] * k for k in (5, 3, 3, 9, 1)]
    assert generation_batches(prompts, 2) == [[4, 1], [2, 0], [3]]
    assert generation_batches(prompts, 2, (0, 2)) + generation_batches(prompts, 2, (1, 2)) == [[4, 1], [3], [2, 0]]


def test_a_metric_failing_on_rank_0_fails_every_rank(tiny_tokenizer, monkeypatch):
    def broken(*a, **k):
        raise MlxtuneError("eval.metrics: broken on purpose")

    monkeypatch.setattr(scoring, "score_outputs", broken)
    seen: list[str] = []

    def rank(d: Dist):
        try:
            scoring.score_once(d, [], [], recipe())
        except MlxtuneError as e:
            seen.append(f"{d.rank}: {e}")

    run_ranks(2, rank)
    assert sorted(seen) == ["0: eval.metrics: broken on purpose", "1: eval.metrics: broken on purpose"]


# ---------------------------------------------------------------- torchrun, as a user runs it


def events(run: Path) -> list[dict[str, Any]]:
    return [e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if e["event"] == "eval"]


def test_torchrun_sharded_eval_matches_one_process(tmp_path, tiny_model_dir):
    recipe_path = write_recipe(tmp_path, tiny_model_dir, steps=2, save_every=0)
    text = recipe_path.read_text().replace("[eval]\nbefore = false", '[eval]\nbefore = true\nbatch_size = 2\n'
                                           'metrics = ["bleu"]\ngen_batch_size = 2\nmax_new_tokens = 8')
    recipe_path.write_text(text)
    two = check(TORCHRUN + mlxtune(recipe_path, "--backend", "torch"), tmp_path)
    assert "2 processes share the eval batches" in two.stdout + two.stderr
    check([sys.executable] + mlxtune(recipe_path, "--backend", "torch", "--set", "train.micro_batch=4", "--set", "output.name=one"), tmp_path)
    a, b = events(tmp_path / "runs/two"), events(tmp_path / "runs/one")
    assert [e["step"] for e in a] == [e["step"] for e in b] == [0, 2]
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"] and x["generated"] == y["generated"] > 0
    gens = ["base.jsonl", "step-000002.jsonl"]
    same = [(tmp_path / "runs/two/generations" / g).read_text() == (tmp_path / "runs/one/generations" / g).read_text() for g in gens]
    diffs = [abs(x["loss"] - y["loss"]) for x, y in zip(a, b)] + [abs(x["loss_full"] - y["loss_full"]) for x, y in zip(a, b)]
    print(f"torch sharded eval, 2 processes vs 1: base loss |diff| {diffs[0]:.3g}, final loss |diff| {diffs[1]:.3g}, "
          f"bleu {[x['bleu'] for x in a]} vs {[y['bleu'] for y in b]}, generations files equal {same}")
    # the base eval (same weights on both) is the same computation: equal to the last bit
    assert a[0]["loss"] == b[0]["loss"] and a[0]["loss_full"] == b[0]["loss_full"] and a[0]["bleu"] == b[0]["bleu"]
    assert max(diffs) <= 1e-6
    assert a[1]["bleu"] == b[1]["bleu"] and all(same)
