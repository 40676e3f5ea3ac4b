"""Where the MLX backend's training step spends its time, phase by phase, next to raw MLX.

    python bench/mlx_phases.py [--recipe bench/bench.toml] [--batches 4] [--repeats 3]
    python bench/mlx_phases.py --kernels   # the forward's op groups and exp/sigmoid throughput, raw MLX

Loads the bench recipe's model (the embedded SmolLM2-135M) and adapter into the MLX backend,
takes the first ``--batches`` real micro-batches of mlxtune's batcher, and times each phase with
``mx.eval`` barriers (median over batches x repeats, after a warm-up pass on every batch):

- ``convert``: numpy batch -> mx arrays (``_targets``: the shift, the loss rows);
- ``forward``: the body forward ``model.model(inputs)``;
- ``loss``: the chunked cross-entropy with its hidden-state gradient, on a fixed body output;
- ``fwd+bwd``: ``value_and_grad`` of body + loss (the backend's step function);
- ``norm+sync``: the update's host syncs (the global grad norm, read on the host);
- ``update``: the backend's whole update (norm, host check, clip, AdamW), evaluated;
- ``train_step``: the backend's whole ``train_step(update=True)``;

and the raw MLX equivalents: ``matmul fwd`` / ``matmul fwd+bwd``, the same projections
(``bench/matmul_rate.py``'s shapes, rows = B x T) as a bare ``mx.matmul`` chain, and mlx-lm's
own model with its LoRA (``mlx_lm.tuner``) on the same batch: forward, forward+backward, and its
trainer's compiled step. GFLOP/s use ``mlxtune/planning/flops.py``'s model FLOPs; "of rate" is
that over the measured matmul rate of the model's shapes (``matmul_rate.mlx_rates``).

Re-executes itself with Debian's OpenBLAS preloaded, as the ``mlxtune`` command does.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def timed(fn: Callable[[Any], Any], items: list[Any], repeats: int) -> float:
    """Median seconds of ``fn(item)`` over items x repeats, after one warm-up call per item."""
    for it in items:
        fn(it)
    ts = []
    for _ in range(repeats):
        for it in items:
            t0 = time.perf_counter()
            fn(it)
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def load(recipe_path: Path, n_batches: int):
    """(recipe, model_dir, backend with optimizer, batches)."""
    from mlxtune.data.batching import train_stream
    from mlxtune.models.source import pad_id
    from mlxtune.recipe.loading import load_recipe
    from mlxtune.training.session import load_backend_with_adapter, prepare

    recipe = load_recipe(recipe_path, [])
    model_dir, tokenizer, data = prepare(recipe)
    t = recipe.train
    stream = train_stream(data.train, t.micro_batch, t.seed, t.bucket, pad_id(tokenizer))
    batches = [next(stream) for _ in range(n_batches)]
    backend = load_backend_with_adapter("mlx", model_dir, recipe)
    backend.setup_optimizer(recipe)
    return recipe, model_dir, backend, batches


def mlxtune_phases(backend, batches, repeats: int) -> dict[str, float]:
    import mlx.core as mx

    from backends.apple_mlx import _global_norm
    from backends.mlx_loss import _loss, _targets
    from mlxtune.planning.memory import ce_chunk_rows

    model, hidden = backend.model, backend.adapter.hidden
    model.train()
    conv = [_targets(b.tokens, b.mask) for b in batches]
    chunk = ce_chunk_rows(model.args.vocab_size)
    inv = mx.array(1e-3, dtype=mx.float32)
    h_fixed = [mx.stop_gradient(hidden(model, c[0])) for c in conv]
    mx.eval(h_fixed)
    pairs = list(zip(conv, h_fixed))

    def step(c):
        nll, grads = backend._step_fn(*c, inv)
        mx.eval(nll, grads)
        return grads

    grads = step(conv[0])
    out = {
        "convert": timed(lambda b: mx.eval(*_targets(b.tokens, b.mask)), batches, repeats),
        "forward": timed(lambda c: mx.eval(hidden(model, c[0])), conv, repeats),
        "loss": timed(lambda p: mx.eval(_loss(model, lambda m, x: p[1], *p[0], inv, chunk)), pairs, repeats),
        "fwd+bwd": timed(step, conv, repeats),
        "norm+sync": timed(lambda g: float(_global_norm(g)), [grads], repeats * len(batches)),
    }

    def update(g):  # the backend's whole update: norm, host check, clip, AdamW, evaluated
        backend._grads = g
        backend._update(1e-5)

    out["update"] = timed(update, [grads], repeats * len(batches))
    out["train_step"] = timed(lambda b: backend.train_step(b.tokens, b.mask, max(b.n_targets, 1), True, 1e-5),
                              batches, repeats)
    return out


def matmul_phases(cfg: dict[str, Any], rows: int, repeats: int) -> dict[str, float]:
    """The body's projections as a bare matmul chain: forward, and forward + input-gradient."""
    import mlx.core as mx

    from bench.matmul_rate import model_shapes

    shapes = [s for s in model_shapes(cfg, rows) if s[0] != "head"]
    ws = {name: mx.random.normal((o, i)) * 0.02 for name, _, i, o, _ in shapes}
    x = {i: mx.random.normal((rows, i)) for _, _, i, _, _ in shapes}
    mx.eval(ws, x)
    layers = shapes[0][4]

    def chain(bwd: bool) -> None:
        outs = []
        for _ in range(layers):
            for name, _, i, o, _ in shapes:
                y = x[i] @ ws[name].T
                outs.append(y.sum() if not bwd else (y @ ws[name]).sum())
        mx.eval(outs)

    return {"matmul fwd": timed(lambda _: chain(False), [0], repeats),
            "matmul fwd+bwd": timed(lambda _: chain(True), [0], repeats)}


def mlx_lm_phases(model_dir: Path, recipe, batches, repeats: int) -> dict[str, float]:
    """mlx-lm's model + LoRA (its own loader, ``linear_to_lora_layers``, ``default_loss``, trainer step)."""
    from functools import partial

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np
    from mlx_lm.tuner.trainer import default_loss
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    from backends.mlx_config import mlx_model_config

    _, cfg = mlx_model_config(model_dir)
    model, _ = load_model(model_dir, model_config=cfg)
    model.freeze()
    a = recipe.adapter
    keys = [k for k in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj") if k.rsplit(".", 1)[1] in a.target_modules]
    linear_to_lora_layers(model, len(model.layers), {"rank": a.rank, "scale": a.scale, "dropout": 0.0, "keys": keys})
    model.train()
    data = []
    for b in batches:
        lengths = np.stack([np.argmax(b.mask, axis=1), b.full_mask.sum(axis=1) + 1], axis=1).astype(np.int32)
        data.append((mx.array(b.tokens), mx.array(lengths)))
    vg = nn.value_and_grad(model, default_loss)
    opt = optim.Adam(learning_rate=1e-5)
    opt.init(model.trainable_parameters())
    state = [model.state, opt.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch, lengths):
        (lvalue, toks), grad = vg(model, batch, lengths)
        opt.update(model, grad)
        return lvalue, toks

    return {
        "mlx-lm forward": timed(lambda d: mx.eval(model.model(d[0][:, :-1])), data, repeats),
        "mlx-lm fwd+bwd": timed(lambda d: mx.eval(vg(model, *d)), data, repeats),
        "mlx-lm step": timed(lambda d: mx.eval(step(*d), state), data, repeats),
    }


def phase_flops(cfg: dict[str, Any], recipe, batches, n_layers: int) -> dict[str, float]:
    """Model FLOPs of each phase on the mean batch (flops.py's conventions, per step)."""
    from mlxtune.planning.flops import training_flops
    from mlxtune.planning.memory import planner_shape

    shape, a = planner_shape(cfg), recipe.adapter
    pos = statistics.mean(b.tokens.shape[0] * (b.tokens.shape[1] - 1) for b in batches)
    width = statistics.mean(b.tokens.shape[1] - 1 for b in batches)
    share = statistics.mean(b.n_targets for b in batches) / pos
    full = training_flops(shape, a.rank, set(a.target_modules), n_layers, width, share)
    fwd0 = training_flops(shape, a.rank, set(), n_layers, width, share)  # nothing trained: forward only
    block = 2.0 * sum(i * o for i, o in shape.linears().values()) * shape.layers * pos
    fwd = (fwd0.body + fwd0.attention + full.adapter / 3) * pos
    return {"forward": fwd, "loss": full.head * pos, "fwd+bwd": full.total * pos, "train_step": full.total * pos,
            "matmul fwd": block, "matmul fwd+bwd": 2 * block, "mlx-lm forward": fwd,
            "mlx-lm fwd+bwd": full.total * pos, "mlx-lm step": full.total * pos, "_positions": pos}


def forward_kernels(cfg: dict[str, Any], batch_shape: tuple[int, int], rank: int, repeats: int) -> list[tuple[str, float, str]]:
    """The body forward's op groups for all blocks, each as raw MLX on random inputs of the step's
    shape ((name, seconds, note)), and elementwise throughput: where MLX's CPU kernels, not
    mlxtune, set the limit (an exp-bound op next to a matmul of the same data)."""
    import mlx.core as mx
    import mlx.nn as nn

    b, t = batch_shape
    d, f, n = int(cfg["hidden_size"]), int(cfg["intermediate_size"]), int(cfg["num_hidden_layers"])
    heads, kv = int(cfg["num_attention_heads"]), int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    hd = int(cfg.get("head_dim") or d // heads)
    r = mx.random
    x, u, q, k = r.normal((b * t, d)), r.normal((b, t, f)), r.normal((b, heads, t, hd)), r.normal((b, heads, t, hd))
    w = {name: r.normal(shape) for name, shape in (("attn", (heads * hd + 2 * kv * hd + heads * hd, d)), ("mlp", (3 * f, d)))}
    a, bb = r.normal((d, rank)), r.normal((rank, d))
    mx.eval(x, u, q, k, a, bb, *w.values())
    groups = {
        "attention (sdpa)": lambda: [mx.fast.scaled_dot_product_attention(q, k, k, scale=hd ** -0.5, mask="causal") for _ in range(n)],
        "base matmuls": lambda: [x @ w["attn"].T for _ in range(n)] + [x @ w["mlp"].T for _ in range(n)],
        "silu(gate) * up": lambda: [nn.silu(u) * u for _ in range(n)],
        "lora x@A@B (x7)": lambda: [(x @ a) @ bb for _ in range(7 * n)],
        "rms_norm (x2)": lambda: [mx.fast.rms_norm(x, mx.ones(d), 1e-5) for _ in range(2 * n)],
        "exp": lambda: [mx.exp(u) for _ in range(n)],
        "sigmoid": lambda: [mx.sigmoid(u) for _ in range(n)],
        "multiply": lambda: [u * u for _ in range(n)],
    }
    out = []
    for name, fn in groups.items():
        sec = timed(lambda _: mx.eval(fn()), [None], repeats)
        note = f"{u.size * n / sec / 1e6:.0f} M elements/s" if name in ("exp", "sigmoid", "multiply") else f"{n} blocks"
        out.append((name, sec, note))
    return out


def table(times: dict[str, float], flops: dict[str, float], rate: float) -> str:
    step = times["train_step"]
    lines = [f"{'phase':<16}{'ms':>9}{'of step':>9}{'GFLOP/s':>9}{'of rate':>9}"]
    for name, s in times.items():
        f = flops.get(name)
        g = f / s / 1e9 if f else None
        lines.append(f"{name:<16}{s * 1e3:>9.1f}{s / step:>9.0%}" + (f"{g:>9.1f}{g / rate:>9.0%}" if g else f"{'':>9}{'':>9}"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from mlxtune.system.blas import blas_summary, maybe_reexec_with_openblas

    maybe_reexec_with_openblas()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", type=Path, default=HERE / "bench.toml")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-mlx-lm", action="store_true", help="skip mlx-lm's model")
    p.add_argument("--kernels", action="store_true", help="only the forward's op groups and elementwise throughput, raw MLX (no model load)")
    args = p.parse_args(argv)

    from bench.matmul_rate import mlx_rates, model_shapes
    from mlxtune.models.source import read_config

    if args.kernels:
        from mlxtune.models.source import resolve_model
        from mlxtune.recipe.loading import load_recipe

        recipe = load_recipe(args.recipe, [])
        cfg = read_config(resolve_model(recipe.model.path))
        print(f"blas: {blas_summary()}; the forward's op groups on random inputs, micro batch 4 x 224, raw MLX")
        for name, sec, note in forward_kernels(cfg, (4, 224), recipe.adapter.rank, args.repeats):
            print(f"{name:<20}{sec * 1e3:>9.1f} ms   {note}")
        return 0
    recipe, model_dir, backend, batches = load(args.recipe, args.batches)
    cfg = read_config(model_dir)
    flops = phase_flops(cfg, recipe, batches, len(backend.adapter.layers))
    rows = round(flops["_positions"])
    rate = mlx_rates(model_shapes(cfg, rows))["mlx_fp32"]
    print(f"blas: {blas_summary()}; batches {[b.tokens.shape for b in batches]}; {rows} positions/step; "
          f"matmul rate {rate:.1f} GFLOP/s; compiled {backend.compile}", flush=True)
    times = mlxtune_phases(backend, batches, args.repeats)
    print(table(times, flops, rate), flush=True)  # each group as soon as it is measured: a long run
    for group in (lambda: matmul_phases(cfg, rows, args.repeats),
                  lambda: {} if args.no_mlx_lm else mlx_lm_phases(model_dir, recipe, batches, args.repeats)):
        new = group()
        times.update(new)
        print("\n".join(table(times, flops, rate).splitlines()[-len(new):]) if new else "", flush=True)
    print(f"train_step: {rows / times['train_step']:.1f} positions/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
