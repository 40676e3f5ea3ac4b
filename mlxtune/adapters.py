"""Adapter bookkeeping shared by every backend: which blocks, and the initial weights.

The initial LoRA weights are drawn here, once, with numpy, and loaded into whichever backend
runs; that is what makes step-by-step comparisons between backends possible.
"""

from __future__ import annotations

import zlib

import numpy as np

from .errors import MlxtuneError


def select_layers(num_layers: int, spec: str | int | list[int]) -> list[int]:
    """Block indices that get adapters: "all", the last N, or an explicit list."""
    if spec == "all":
        return list(range(num_layers))
    if isinstance(spec, int):
        if spec > num_layers:
            raise MlxtuneError(f"adapter.layers = {spec} but the model has only {num_layers} blocks")
        return list(range(num_layers - spec, num_layers))
    bad = [i for i in spec if not 0 <= i < num_layers]
    if bad:
        raise MlxtuneError(f"adapter.layers: block indices {bad} out of range for a model with {num_layers} blocks (0..{num_layers - 1})")
    return sorted(set(spec))


def init_lora(shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> dict[str, np.ndarray]:
    """LoRA init as PEFT does it: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform, a=sqrt(5)),
    B = 0, so the adapted model starts equal to the base model.

    ``shapes`` maps module path -> (in_features, out_features). Each module draws from its own
    stream seeded by (seed, crc32 of its path), so its values do not depend on dict order or on
    which other modules are adapted.
    """
    weights = {}
    for name in sorted(shapes):
        fan_in, fan_out = shapes[name]
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        bound = 1.0 / np.sqrt(fan_in)
        weights[f"{name}.lora_A"] = rng.uniform(-bound, bound, size=(rank, fan_in)).astype(np.float32)
        weights[f"{name}.lora_B"] = np.zeros((fan_out, rank), dtype=np.float32)
    return weights
