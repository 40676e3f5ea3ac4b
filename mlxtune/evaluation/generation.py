"""Batched text generation on any backend (numpy only; no framework import).

Two layers:

- :func:`decode_loop` is the token loop every backend's ``generate`` runs: sampling, eos,
  ``should_stop`` and ``max_tokens`` are decided here, once, on numpy logits, so greedy decoding
  is the same argmax (same tie-break) on torch and on MLX and seeded sampling draws the same
  numbers. A backend only supplies the forward passes (prefill of the left-padded prompts, then
  one token per still-running row, with its KV cache).
- :func:`generate_texts` is what the evaluation code calls: prompts (token ids from
  :func:`mlxtune.data.records.encode_prompt`, the exact training prefix) -> texts, in batches of
  similar length, with the tokenizer's end-of-turn ids and the recipe's stop strings. It reports
  to a :class:`Progress` when given one (the command layer draws it as a bar).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from mlxtune.errors import MlxtuneError
from mlxtune.models.source import pad_id

if TYPE_CHECKING:
    from backends import Backend

# step(next_tokens int32[k], keep) -> float32 logits[k, V] for the next position. ``keep`` holds
# the positions (in the previous step's batch) of the rows still running, or None when all are.
StepFn = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]


class Progress(Protocol):
    """Where a long job reports how far it is: ``start`` once with the number of items (prompts),
    ``advance`` after each batch with the items it finished and the rate so far as text, ``close``
    at the end (also when the job fails). One object may be started again after ``close``."""

    def start(self, total: int) -> None: ...

    def advance(self, n: int, rate_text: str) -> None: ...

    def close(self) -> None: ...


@dataclass
class GenSettings:
    """How to generate: ``temperature`` 0 is greedy; ``stop`` strings end a row and are cut off
    the text (with everything after them)."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.stop = tuple(self.stop)
        check_sampling(self.temperature, self.top_p)
        if self.max_tokens < 1:
            raise MlxtuneError(f"generation max_tokens = {self.max_tokens}: must be at least 1")
        if self.seed < 0:
            raise MlxtuneError(f"generation seed = {self.seed}: must be >= 0")
        if self.batch_size < 1:
            raise MlxtuneError(f"generation batch_size = {self.batch_size}: must be at least 1")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise MlxtuneError(f"generation stop = {list(self.stop)!r}: stop sequences must be non-empty strings")


def check_sampling(temperature: float, top_p: float) -> None:
    if not temperature >= 0:
        raise MlxtuneError(f"generation temperature = {temperature}: must be >= 0 (0 = greedy)")
    if not 0 < top_p <= 1:
        raise MlxtuneError(f"generation top_p = {top_p}: must be in (0, 1] (1 = no nucleus cut)")


# ------------------------------------------------------------------ the decode loop


def left_pad(prompts: list[np.ndarray], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(int32[B, T] left-padded ids, int64[B] number of pad positions per row)."""
    arrays = []
    for i, p in enumerate(prompts):
        a = np.asarray(p)
        if a.ndim != 1 or a.size == 0 or not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"prompt {i}: expected a non-empty 1-D array of token ids, got shape {a.shape} dtype {a.dtype}")
        arrays.append(a.astype(np.int32))
    width = max(len(a) for a in arrays)
    ids = np.full((len(arrays), width), pad_id, dtype=np.int32)
    padding = np.array([width - len(a) for a in arrays], dtype=np.int64)
    for row, (a, pad) in enumerate(zip(arrays, padding)):
        ids[row, pad:] = a
    return ids, padding


def _nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Indices of the smallest set of most probable tokens whose mass reaches ``top_p``, in
    descending order of probability. Sorts a growing top-k (argpartition) rather than the
    whole vocabulary, which is what costs time on a 50k-150k vocabulary."""
    k = min(64, probs.size)
    while True:
        top = np.argpartition(-probs, k - 1)[:k] if k < probs.size else np.arange(probs.size)
        top = top[np.argsort(-probs[top], kind="stable")]
        cum = np.cumsum(probs[top])
        if cum[-1] >= top_p or k == probs.size:
            return top[: min(int(np.searchsorted(cum, top_p)) + 1, k)]
        k = min(k * 4, probs.size)


def sample_next(logits: np.ndarray, temperature: float, top_p: float, rngs: list[np.random.Generator]) -> np.ndarray:
    """One token per row of ``logits`` [k, V]: argmax at temperature 0, else a draw from
    softmax(logits / temperature) restricted to the top_p nucleus, one uniform per row from
    that row's generator (inverse CDF, so the draw is a pure function of logits and seed)."""
    logits = np.asarray(logits, dtype=np.float32)
    if temperature == 0:
        return logits.argmax(axis=-1).astype(np.int32)
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=-1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(axis=-1, keepdims=True)
    out = np.empty(len(probs), dtype=np.int32)
    for r, (p, rng) in enumerate(zip(probs, rngs)):
        cand = _nucleus(p, top_p) if top_p < 1 else np.arange(p.size)
        cdf = np.cumsum(p[cand])
        pick = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
        out[r] = cand[min(pick, len(cand) - 1)]
    return out


def decode_loop(first_logits: np.ndarray, step: StepFn, max_tokens: int, *, temperature: float = 0.0,
                top_p: float = 1.0, seed: int = 0, eos_ids: Sequence[int] = (),
                should_stop: Callable[[list[int]], bool] | None = None) -> list[list[int]]:
    """Run the rows of a batch to their ends; see ``Backend.generate`` for the contract.

    ``first_logits`` [B, V] are the logits after each row's prompt. Each row samples from its
    own generator seeded by (seed, row), so a row's draws do not depend on when other rows end.
    Finished rows are dropped from the batch (``keep``) so the backend stops computing them.
    """
    check_sampling(temperature, top_p)
    n_rows = len(first_logits)
    out: list[list[int]] = [[] for _ in range(n_rows)]
    if max_tokens < 1 or n_rows == 0:
        return out
    eos = {int(e) for e in eos_ids}
    rngs = [np.random.default_rng([seed, row]) for row in range(n_rows)]
    rows = np.arange(n_rows)  # original indices of the rows in the current batch
    logits = first_logits
    while True:
        tokens = sample_next(logits, temperature, top_p, [rngs[r] for r in rows])
        running = []
        for pos, (row, tok) in enumerate(zip(rows, tokens.tolist())):
            if tok in eos:
                continue
            out[row].append(tok)
            if len(out[row]) >= max_tokens or (should_stop is not None and should_stop(out[row])):
                continue
            running.append(pos)
        if not running:
            return out
        keep = None if len(running) == len(rows) else np.asarray(running, dtype=np.int64)
        rows = rows[running]
        logits = step(tokens[running], keep)


# ------------------------------------------------------------------ tokenizer helpers


def eos_token_ids(tokenizer: Any) -> list[int]:
    """The tokenizer's eos id plus the chat template's end-of-turn token when it is another
    special token (SmolLM2 and Qwen: ``<|im_end|>``; Llama 3: ``<|eot_id|>``): the token the
    model learned to put after a response in training."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    if getattr(tokenizer, "chat_template", None):
        marker = "mlxtune-end-of-turn-probe"
        msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
        try:
            text = tokenizer.apply_chat_template(msgs, tokenize=False)
        except Exception:  # templates may reject the probe conversation; then eos alone
            text = ""
        after = text.split(marker, 1)[1].lstrip() if marker in text else ""
        if after:
            first = tokenizer(after, add_special_tokens=False)["input_ids"][:1]
            if first and first[0] in set(tokenizer.all_special_ids) and first[0] not in ids:
                ids.append(int(first[0]))
    return ids


def stop_checker(tokenizer: Any, stops: Sequence[str]) -> Callable[[list[int]], bool] | None:
    """``should_stop`` for stop strings: decodes only the tail of the row (enough tokens to
    hold the longest stop string) at every step, since a new match must end in the new token."""
    stops = tuple(stops)
    if not stops:
        return None
    window = max(len(s) for s in stops) + 8

    def should_stop(ids: list[int]) -> bool:
        tail = tokenizer.decode(ids[-window:], skip_special_tokens=True)
        return any(s in tail for s in stops)

    return should_stop


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the earliest stop string (the stop string itself removed)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def chunk_seed(seed: int, indices: Sequence[int]) -> int:
    """Seed of one generation batch from the run's seed and the prompts' original indices."""
    return int(np.random.SeedSequence([int(seed), *map(int, indices)]).generate_state(1)[0])


# ------------------------------------------------------------------ prompts -> texts


def generation_batches(prompts: Sequence[np.ndarray], batch_size: int, share: tuple[int, int] = (0, 1)) -> list[list[int]]:
    """The batches (prompt indices) :func:`generate_texts` runs: sorted by length, ``batch_size``
    at a time; with ``share = (rank, size)`` only batches ``rank, rank + size, ...`` of them."""
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    chunks = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    return chunks[share[0]::share[1]]


def generate_texts(backend: Backend, tokenizer: Any, prompts: list[np.ndarray], settings: GenSettings, *,
                   adapter: bool = True, progress: Progress | None = None, share: tuple[int, int] = (0, 1)) -> list[str]:
    """Generate a text for every prompt, in the input order.

    Prompts are sorted by length and cut into batches of ``settings.batch_size`` so a batch
    holds similar lengths (little padding); each batch's seed comes from ``settings.seed`` and
    the original indices of its prompts. Texts are decoded without special tokens and cut at
    the first stop string. ``progress``, when given, hears of every finished batch (with the
    prompts per second so far). ``share = (rank, size)`` runs only that rank's batches
    (:func:`generation_batches`; the other texts stay ""): each is the very batch one process
    runs (same prompts, padding and seed), so the ranks' texts together are one process's, sampled
    ones included.
    """
    n = len(prompts)
    chunks = generation_batches(prompts, settings.batch_size, share)
    eos, pad = eos_token_ids(tokenizer), pad_id(tokenizer)
    should_stop = stop_checker(tokenizer, settings.stop)
    texts: list[str] = [""] * n

    def run_chunk(chunk: list[int]) -> None:
        outs = backend.generate(
            [prompts[i] for i in chunk], settings.max_tokens, temperature=settings.temperature,
            top_p=settings.top_p, seed=chunk_seed(settings.seed, chunk), eos_ids=eos, pad_id=pad,
            adapter=adapter, should_stop=should_stop,
        )
        for i, ids in zip(chunk, outs):
            texts[i] = cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), settings.stop)

    if progress is None:
        for chunk in chunks:
            run_chunk(chunk)
        return texts

    start = time.perf_counter()
    progress.start(sum(map(len, chunks)))  # under a launcher: this rank's share
    try:
        done = 0
        for chunk in chunks:
            run_chunk(chunk)
            done += len(chunk)
            progress.advance(len(chunk), f"{done / max(time.perf_counter() - start, 1e-9):.2f} prompts/s")
    finally:
        progress.close()
    return texts
