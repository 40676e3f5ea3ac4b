"""Peak-memory model of one LoRA training step, from the model's config.json alone.

No framework is imported: the model is arithmetic on the config (layers, hidden and
intermediate sizes, heads, KV heads, vocabulary, tied embeddings), the base dtype or
quantization, the adapter (rank, targets, layers), AdamW, the micro batch, the sequence length
and gradient checkpointing. Each term counts the tensors the backend really keeps; the
per-backend differences (which intermediate a framework saves for backward, MLX's attention
keeping the B x H x T x T probabilities on the CPU) are written out in :func:`_layer_saved`.
How well it predicts is measured by ``bench/memory_grid.py`` (README, "Memory planning").

Both backends compute the loss with a chunked cross-entropy (:func:`ce_chunk_rows` rows at a
time, only at positions that carry loss), so the logits term is one chunk, not B x T x V.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from mlxtune.adapters.lora import select_layers
from mlxtune.models.shape import ModelShape
from mlxtune.recipe.schema import ALL_PROJECTIONS

CE_CHUNK_BYTES = 32 * 2**20  # float32 logits held at once by the chunked cross-entropy
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def ce_chunk_rows(vocab_size: int) -> int:
    """Positions per chunk of the vocabulary projection, so one chunk of float32 logits stays
    near CE_CHUNK_BYTES whatever the vocabulary (Llama-3's 128k: 65 rows; SmolLM2's 49k: 170)."""
    return max(16, CE_CHUNK_BYTES // (4 * max(1, int(vocab_size))))


# ---------------------------------------------------------------- the model's shape


def planner_shape(cfg: dict, where: str = "config.json") -> ModelShape:
    """The model's sizes as config.json states them (any decoder whose sizes it names, GPT-2's
    ``n_layer``/``n_embd``/``n_head`` included). The memory model describes a Llama-style block
    (q/k/v/o + gated MLP); for other blocks of the same widths it errs on the high side."""
    from mlxtune.models.source import with_size_aliases

    if cfg.get("text_config"):  # multimodal wrappers (Gemma 3) keep the decoder's sizes there
        cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type", cfg.get("model_type"))}
    return ModelShape.from_config(with_size_aliases(dict(cfg)), where)


# ---------------------------------------------------------------- what a step keeps


@dataclass(frozen=True)
class StepSetup:
    """How the step runs: backend and device, base precision, adapter, checkpointing."""

    backend: str = "torch"  # "torch" | "mlx"
    device: str = "cpu"  # "cpu" | "cuda" | "mps" | "metal"
    dtype: str = "float32"
    quantize_bits: int = 0
    quantize_group_size: int = 64
    rank: int = 8
    targets: tuple[str, ...] = ALL_PROJECTIONS
    layers: str | int | list[int] = "all"
    grad_checkpointing: bool = False
    # prompt/prefix tuning: virtual tokens that every block processes (no LoRA, targets empty)
    method: str = "lora"
    virtual_tokens: int = 0
    prefix_projection: bool = False
    prefix_hidden: int = 0
    shard_over: int = 1  # train.shard_base under N processes: each holds 1/N of the blocks' weights
    bf16_projections: bool = False  # torch, train.autocast bfloat16 over float32: the blocks' frozen linears stored in bf16

    @classmethod
    def from_recipe(cls, recipe, backend: str, device: str, grad_checkpointing: bool | None = None) -> StepSetup:
        from mlxtune.models.quantization import base_bits

        bits = base_bits(recipe)
        ckpt = recipe.train.grad_checkpointing is True if grad_checkpointing is None else grad_checkpointing
        kw = {"targets": tuple(recipe.adapter.target_modules), "layers": recipe.adapter.layers} | _virtual_setup(recipe.adapter)
        bf16 = (backend == "torch" and recipe.train.autocast == "bfloat16" and recipe.model.dtype == "float32"
                and not bits and not recipe.train.shard_base)  # as backends/torch_peft.py stores them
        return cls(backend=backend, device=device, dtype=recipe.model.dtype, quantize_bits=bits,
                   quantize_group_size=recipe.model.quantize_group_size, rank=recipe.adapter.rank,
                   grad_checkpointing=ckpt, bf16_projections=bf16, **kw)


def _virtual_setup(a) -> dict:
    if a.method not in ("prompt", "prefix"):
        return {}
    return {"method": a.method, "virtual_tokens": a.num_virtual_tokens, "targets": (), "layers": "all",
            "prefix_projection": a.method == "prefix" and a.prefix_projection, "prefix_hidden": a.prefix_hidden}


def virtual_parameters(shape: ModelShape, s: StepSetup) -> int:
    """Trainable parameters of a prompt/prefix adapter (mlxtune/adapters/virtual.py's layout)."""
    from types import SimpleNamespace

    from mlxtune.adapters.virtual import VirtualSpec

    a = SimpleNamespace(method=s.method, num_virtual_tokens=s.virtual_tokens, prefix_projection=s.prefix_projection,
                        prefix_hidden=s.prefix_hidden)
    return VirtualSpec.from_shape(shape, a).parameters()


@dataclass
class Estimate:
    """Predicted peak bytes of one training step, by part."""

    weights: int
    adapter: int  # adapter parameters + gradients + AdamW moments
    activations: int  # what the blocks keep for backward until their backward runs
    logits: int  # the loss: selected hidden states, their gradient, chunks of float32 logits
    backward: int  # one block's backward: its recomputed activations (checkpointing) and gradients
    overhead: int  # framework runtime outside the allocator's counters (CUDA context, Metal, ...)

    @property
    def step_total(self) -> int:
        """What the allocator's peak counter sees (mx.get_peak_memory, cuda.max_memory_allocated):
        the loss runs before the blocks' backward, so the larger of the two counts."""
        return self.weights + self.adapter + self.activations + max(self.logits, self.backward)

    @property
    def total(self) -> int:
        return self.step_total + self.overhead

    def as_dict(self) -> dict:
        return asdict(self) | {"step_total": self.step_total, "total": self.total}

    def rows(self) -> list[tuple[str, int, bool]]:
        """(part, bytes, counted in the total): only the larger of loss and block backward is."""
        loss_peak = self.logits >= self.backward
        return [("weights", self.weights, True), ("adapter + grads + AdamW", self.adapter, True),
                ("activations kept for backward", self.activations, True),
                ("logits and loss (chunked)", self.logits, loss_peak),
                ("backward working set", self.backward, not loss_peak),
                ("framework overhead", self.overhead, True)]


def _weight_bytes(shape: ModelShape, s: StepSetup) -> int:
    p, db = shape.parameters(), DTYPE_BYTES[s.dtype]
    if s.shard_over > 1 and not s.quantize_bits:
        # FSDP2 (backends/torch_fsdp.py): 1/N of every block, two blocks gathered whole at a time
        # (the one running and the next one prefetched), and the rest of the model (embedding,
        # head) gathered for the whole step, since the step runs inside its root's forward
        blocks = p["projections"] + p["other"]
        gathered = min(2 * blocks // max(shape.layers, 1), blocks)
        return db * (p["embedding"] + p["head"] + math.ceil(blocks / s.shard_over) + gathered)
    if s.bf16_projections:
        return 2 * p["projections"] + db * (p["embedding"] + p["head"] + p["other"])
    if not s.quantize_bits:
        return db * sum(p.values())
    if s.backend == "mlx":  # affine: b bits + a scale and a bias (model dtype) per group; embedding and head too
        per = s.quantize_bits / 8 + 2 * db / s.quantize_group_size
        return int(per * (p["projections"] + p["embedding"] + p["head"]) + db * p["other"])
    # bitsandbytes: NF4 = 4 bits + an 8-bit absmax per 64 weights (double quantization) + a float32
    # per 256 absmax; LLM.int8 = 1 byte + a float per row. Embedding, head and norms are not
    # quantized, and peft's prepare_model_for_kbit_training (backends/torch_peft.py) makes them float32.
    per = 0.5 + 1 / 64 + 4 / (64 * 256) if s.quantize_bits == 4 else 1.0
    return int(per * p["projections"] + 4 * (p["embedding"] + p["head"] + p["other"]))


def lora_parameters(shape: ModelShape, s: StepSetup) -> int:
    per_layer = sum(s.rank * (i + o) for name, (i, o) in shape.linears().items() if name in s.targets)
    return per_layer * len(select_layers(shape.layers, s.layers))


def _adapted_inputs(shape: ModelShape, targets: set[str], a: int, backend: str) -> int:
    """Bytes per token of the inputs LoRA's A matrices keep for their gradient. In float32 the
    projections that share an input share the tensor (on torch, o_proj's input is the attention
    output SDPA keeps anyway); in 16 bits each adapted projection casts its input to float32
    (the adapter's dtype) and keeps that copy."""
    lin = shape.linears()
    if a != 4:
        return sum(4 * lin[t][0] for t in targets if t in lin)
    groups = [({"q_proj", "k_proj", "v_proj"}, shape.hidden), ({"gate_proj", "up_proj"}, shape.hidden),
              ({"down_proj"}, shape.intermediate)]
    if backend == "mlx":
        groups.append(({"o_proj"}, shape.heads * shape.head_dim))
    return sum(a * n for names, n in groups if names & targets)


def _layer_saved(shape: ModelShape, s: StepSetup, targets: set[str], seq: int) -> int:
    """Bytes per token one block keeps for backward (without checkpointing)."""
    d, f, H = shape.hidden, shape.intermediate, shape.heads
    q, kv = H * shape.head_dim, shape.kv_heads * shape.head_dim
    a = DTYPE_BYTES[s.dtype]
    lora = 4 * s.rank * len(targets & set(ALL_PROJECTIONS)) + _adapted_inputs(shape, targets, a, s.backend)
    if s.backend == "mlx":
        # rms_norm keeps its 2 inputs; q and k after rope and v for the attention's vjp, which on
        # MLX keeps the softmax probabilities (H x T per token); the MLP keeps gate, sigmoid(gate),
        # silu(gate) and up.
        return 2 * d * a + (q + 2 * kv) * a + H * seq * a + 4 * f * a + lora
    # torch: RMSNorm keeps its 2 inputs in float32; SDPA (flash kernels on CPU and CUDA) keeps q, k,
    # v, its output and a float32 logsumexp per head; the MLP keeps gate, up and silu(gate).
    return 2 * d * 4 + (2 * q + 2 * kv) * a + 4 * H + 3 * f * a + lora


# MLX evaluates forward and backward as one lazy graph, and its scheduler allocates outputs ahead
# of the work, so its backward working set is more than one block's gradients: these are
# per-token counts of (intermediate, hidden, heads x seq)-sized arrays, without and with
# checkpointing, fitted by least squares (relative error) on 35 points each of 7 random llama
# shapes (hidden 48-512, intermediate 192-2048, 2-3 blocks, 128-1024 tokens;
# `bench/memory_grid.py --calibrate`), none of them a model of the accuracy grid.
MLX_BACKWARD = {False: (4.64, 10.34, 1.86), True: (13.46, 17.78, 2.81)}


def _backward_working(shape: ModelShape, s: StepSetup, seq: int, saved_block: int) -> int:
    """Bytes per token alive on top of the kept activations while the blocks run backward."""
    a = DTYPE_BYTES[s.dtype]
    if s.backend == "mlx":
        kf, kd, kt = MLX_BACKWARD[s.grad_checkpointing]
        work = int(a * (kf * shape.intermediate + kd * shape.hidden + kt * shape.heads * seq))
        if s.grad_checkpointing:  # the recomputed block's LoRA outputs (float32) and their gradients
            work += 2 * 4 * s.rank * len(set(s.targets) & set(ALL_PROJECTIONS))
        return work
    # torch: a block's gradients (an intermediate- and a hidden-sized one at a time), the gradient of
    # the hidden states flowing down and the next; with checkpointing the recomputed block's tensors
    work = a * (shape.intermediate + 3 * shape.hidden)
    return work + (saved_block if s.grad_checkpointing else 0)


def estimate(config: dict, setup: StepSetup, micro_batch: int, seq_len: int, accumulate: bool = True,
             where: str = "config.json") -> Estimate:
    """Predicted peak of one training step of ``micro_batch`` rows of ``seq_len`` tokens, every
    position a target (the worst case). ``accumulate``: gradients of earlier micro batches are
    held while this one runs (grad_accum > 1; MLX keeps them apart from the new ones)."""
    shape = planner_shape(config, where)
    s = setup
    a = DTYPE_BYTES[s.dtype]
    tokens = micro_batch * seq_len
    adapted = select_layers(shape.layers, s.layers)
    n_lora = lora_parameters(shape, s)
    if s.method in ("prompt", "prefix"):
        # every block runs on (or attends to) the virtual tokens too, and the gradient reaches
        # the first block: counted as seq_len + n positions in every block (an upper bound for
        # prefix tuning, whose virtual positions are keys and values only); the loss is unchanged
        n_lora, seq_len = virtual_parameters(shape, s), seq_len + s.virtual_tokens
    grad_copies = 2 if s.backend == "mlx" and accumulate else 1
    adapter = n_lora * 4 * (3 + grad_copies)  # float32 parameters, AdamW m and v, gradients

    # Blocks from the lowest adapted one up carry gradients; the ones below keep nothing.
    grad_layers = shape.layers - min(adapted) if adapted else 0
    saved_block = _layer_saved(shape, s, set(s.targets), seq_len)
    top = shape.hidden * (4 if s.backend == "torch" else a)  # the final norm's input
    kept = shape.hidden * a if s.grad_checkpointing else saved_block  # checkpointing: each block's input
    body = micro_batch * seq_len  # positions in the blocks (with the virtual tokens)
    activations = body * (grad_layers * kept + top)
    backward = body * _backward_working(shape, s, seq_len, saved_block)

    rows = ce_chunk_rows(shape.vocab)
    n_chunks = math.ceil(tokens / rows)
    chunk = min(rows, tokens) * shape.vocab * 4
    if s.backend == "mlx":
        # a chunk's logits and softmax, up to three chunks overlapping (measured); the selected
        # rows and their packed gradient are inside the fitted backward working set
        logits = 2 * min(n_chunks, 3) * chunk
    else:  # selected rows and their gradient; the chunk's float32 logits (and a 16-bit copy)
        logits = tokens * shape.hidden * 2 * a + chunk * (1 if a == 4 else 2)
    return Estimate(weights=_weight_bytes(shape, s), adapter=adapter, activations=activations, logits=logits,
                    backward=backward, overhead=framework_overhead(s.backend, s.device))


def framework_overhead(backend: str, device: str) -> int:
    """Memory the run needs outside the allocator's peak counter: a CUDA context with cuBLAS
    workspaces is about 0.5-0.8 GB; Metal's command buffers and kernels, Python and the
    libraries are a few hundred MB on a Mac. Estimates, not measured here (no GPU in CI)."""
    if device == "cuda":
        return int(0.75 * 2**30)
    if device in ("metal", "mps"):
        return int(0.5 * 2**30)
    return int(0.4 * 2**30)  # CPU: the process's libraries and Python heap
