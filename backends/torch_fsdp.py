"""``train.shard_base``: the frozen base sharded across torchrun's ranks with FSDP2 (``fully_shard``).

Each decoder block (the model's ``_no_split_modules`` classes, as accelerate's FSDP wrapping
picks them) and then the rest of the model (embeddings, final norm, head) become FSDP2 units
over a 1-D mesh of all ranks, so a rank holds 1/N of every frozen weight and all-gathers a
block only while it runs (forward, and again in backward). The adapter's parameters are
``ignored_params``: they stay whole, plain tensors on every rank, FSDP never reduces their
gradients, and ``TorchBackend._update`` sums them with its own all_reduce as without sharding.
So the maths (summed gradients, the global clip norm, AdamW, the saved adapter, the optimizer
checkpoint) is unchanged, and no FSDP gradient divide factor is involved.

The rest of the model is an FSDP unit only through :class:`Root`: everything the backend does
with the model (the loss, which uses the head's weight outside the model's forward; eval;
generation) runs inside ``Root``'s forward, where FSDP2 has gathered the root's weights and runs
its lazy init. Every rank must make the same sequence of forward calls (the all-gathers are
collective), which the training loop does; eval and generation must run in lockstep too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from mlxtune.errors import MlxtuneError


class Root(torch.nn.Module):
    """The FSDP2 root: holds the PEFT model (whose non-block weights it shards) and runs any
    function of it inside its forward, with those weights gathered."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)


def decoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder blocks: modules of the classes transformers never splits across devices."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    blocks = [m for m in base.modules() if type(m).__name__ in names]
    if not blocks:
        raise MlxtuneError(f"train.shard_base: {type(base).__name__} names no decoder block class (_no_split_modules), "
                           "so FSDP2 cannot shard it block by block; set train.shard_base = false")
    return blocks


def shard_base(model: torch.nn.Module, device: torch.device, size: int) -> Root:
    """``fully_shard`` each decoder block, then the root around ``model`` (the adapter's parameters
    left whole on every rank); returns the root to run the model through."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (size,))
    adapter = {p for p in model.parameters() if p.requires_grad}
    for block in decoder_blocks(model):
        fully_shard(block, mesh=mesh, ignored_params=adapter)
    root = Root(model)
    fully_shard(root, mesh=mesh, ignored_params=adapter)
    return root


@contextmanager
def gathered(root: Root | None) -> Iterator[None]:
    """Meanwhile every FSDP unit's weights whole on every rank (a collective: all ranks call it),
    for work outside a forward that reads base weights (DoRA's magnitude initialisation)."""
    if root is None:
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in root.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.unshard()
    try:
        yield
    finally:
        for m in units:
            m.reshard()


def base_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of frozen parameters held by this rank, bytes of the whole frozen base)."""
    from torch.distributed.tensor import DTensor

    local = total = 0
    for p in model.parameters():
        if p.requires_grad:
            continue
        total += p.numel() * p.element_size()
        local += (p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size()
    return local, total
