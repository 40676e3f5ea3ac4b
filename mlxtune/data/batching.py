"""Batch order and padding, decided once in the core so every backend sees the same batches."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from mlxtune.data.records import Example, full_mask

BUCKET_BATCHES = 16  # micro batches per length bucket: enough to group lengths, small enough to stay random


@dataclass
class Batch:
    tokens: np.ndarray  # int32[B, T], right-padded
    mask: np.ndarray  # bool[B, T], response targets (or full text when the recipe trains on it)
    full_mask: np.ndarray  # bool[B, T], every real token after the first
    epoch: int = 0

    @property
    def n_targets(self) -> int:
        return int(self.mask.sum())


def collate(examples: list[Example], pad_id: int, epoch: int = 0) -> Batch:
    width = max(len(e) for e in examples)
    tokens = np.full((len(examples), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(examples), width), dtype=bool)
    full = np.zeros((len(examples), width), dtype=bool)
    for i, e in enumerate(examples):
        n = len(e)
        tokens[i, :n] = e.tokens
        mask[i, :n] = e.loss_mask
        full[i, :n] = full_mask(n)
    return Batch(tokens, mask, full, epoch)


def epoch_batches(lengths: list[int], micro_batch: int, seed: int, epoch: int, bucket: bool) -> list[list[int]]:
    """Example indices of each micro batch of one epoch.

    A seeded permutation; with ``bucket`` the permutation is cut into chunks of
    BUCKET_BATCHES micro batches, each chunk sorted by length (longest first) and cut into
    batches, and the batches shuffled again, so batch contents are length-homogeneous while
    the order stays random. The last batch may be smaller.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if not bucket:
        return [order[i:i + micro_batch].tolist() for i in range(0, len(order), micro_batch)]
    batches = []
    chunk = micro_batch * BUCKET_BATCHES
    for start in range(0, len(order), chunk):
        part = order[start:start + chunk]
        part = part[np.argsort([-lengths[i] for i in part], kind="stable")]
        batches += [part[i:i + micro_batch].tolist() for i in range(0, len(part), micro_batch)]
    return [batches[i] for i in rng.permutation(len(batches))]


def batches_per_epoch(n_examples: int, micro_batch: int) -> int:
    return math.ceil(n_examples / micro_batch)


def total_steps(n_examples: int, micro_batch: int, grad_accum: int, epochs: float, steps: int) -> int:
    if steps:
        return steps
    return max(1, math.ceil(epochs * batches_per_epoch(n_examples, micro_batch) / grad_accum))


def train_stream(examples: list[Example], micro_batch: int, seed: int, bucket: bool, pad_id: int,
                 skip: int = 0) -> Iterator[Batch]:
    """Endless micro batches across epochs; ``skip`` drops the first micro batches (resume)."""
    lengths = [len(e) for e in examples]
    epoch = 0
    while True:
        for idx in epoch_batches(lengths, micro_batch, seed, epoch, bucket):
            if skip:
                skip -= 1
                continue
            yield collate([examples[i] for i in idx], pad_id, epoch)
        epoch += 1


def eval_batches(examples: list[Example], batch_size: int, pad_id: int) -> list[Batch]:
    """The whole eval split, sorted by length to pad little; order does not change the sums."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    return [collate([examples[i] for i in order[s:s + batch_size]], pad_id) for s in range(0, len(order), batch_size)]


def split_batch(batch: Batch, max_rows: int = 0, max_tokens: int = 0) -> list[Batch]:
    """A micro batch as forward passes of at most ``max_rows`` rows and ``max_tokens`` tokens
    (rows x padded length; 0 = no limit), each re-padded to its own longest row.

    The loss is a token-weighted sum over the accumulation window, so splitting changes the
    memory of a pass, not the result: rows are taken longest first (little padding), and a row
    is never cut (one row over ``max_tokens`` still gets its own pass).
    """
    lengths = batch.full_mask.sum(axis=1) + 1  # full_mask marks every real token after the first
    n = len(lengths)
    if (not max_rows or n <= max_rows) and (not max_tokens or n * batch.tokens.shape[1] <= max_tokens):
        return [batch]
    order = np.argsort(-lengths, kind="stable")
    groups: list[list[int]] = [[]]
    for i in order:
        group = groups[-1]
        width = int(lengths[group[0]]) if group else int(lengths[i])  # the first row is the longest
        if group and ((max_rows and len(group) >= max_rows) or (max_tokens and (len(group) + 1) * width > max_tokens)):
            groups.append([])
        groups[-1].append(int(i))
    out = []
    for g in groups:
        width = int(lengths[g[0]])
        out.append(Batch(batch.tokens[g, :width], batch.mask[g, :width], batch.full_mask[g, :width], batch.epoch))
    return out


def mask_union(masks: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Several masks scored in one forward pass: (the union of the masks, and per mask a bool
    selector over the union's target positions, in ``union[:, 1:]`` row-major order)."""
    bools = {name: np.asarray(m, dtype=bool) for name, m in masks.items()}
    union = np.logical_or.reduce(list(bools.values()))
    picked = union[:, 1:]
    return union, {name: m[:, 1:][picked] for name, m in bools.items()}
