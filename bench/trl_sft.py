"""Baseline (d): the plain TRL SFTTrainer + peft script a user would write.

Run by ``bench/train_bench.py`` in a fresh process; it reads the settings the harness derived
from the mlxtune recipe (a JSON file) and writes what it measured (another JSON file). The
training itself is stock TRL: ``SFTTrainer`` with its default data collator (pad to the longest
row of each random batch), completion-only loss on a conversational prompt/completion dataset
(so exactly the assistant turn is trained, as in mlxtune), TRL's own fused LM head, PEFT's LoRA
initialisation. The only things added are measurements that do not change the computation: a
callback timing each optimizer step (``on_step_begin`` -> ``on_step_end``: forward, backward,
optimizer, as in mlxtune's loop) and a wrapper around the collator counting the tokens of each
batch.

Settings that differ from TRL's defaults, and why (all listed in the harness's README):
``gradient_checkpointing=False`` (TRL turns it on by default; mlxtune has none, so both sides
keep all activations), ``bf16`` set to the harness's precision for both torch variants (TRL
defaults to bf16 autocast), ``max_grad_norm=0`` (mlx-lm cannot clip, so no variant clips),
a constant learning rate without warmup, and no checkpoints or evaluation during training.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main(config_path: str, out_path: str) -> None:
    cfg = json.loads(Path(config_path).read_text())
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(cfg.get("threads") or torch.get_num_threads())
    tokenizer = AutoTokenizer.from_pretrained(cfg["model"])
    model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32)
    lora = LoraConfig(
        r=cfg["rank"], lora_alpha=cfg["alpha"], lora_dropout=cfg["dropout"], target_modules=cfg["target_modules"],
        layers_to_transform=cfg["layers"], bias="none", task_type="CAUSAL_LM",
    )
    args = SFTConfig(
        output_dir=cfg["work"], max_steps=cfg["steps"], per_device_train_batch_size=cfg["micro_batch"],
        per_device_eval_batch_size=cfg["eval_batch"], gradient_accumulation_steps=1,
        learning_rate=cfg["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=cfg["weight_decay"],
        adam_beta1=cfg["betas"][0], adam_beta2=cfg["betas"][1], adam_epsilon=cfg["eps"], max_grad_norm=0.0,
        seed=cfg["seed"], max_length=cfg["max_seq_len"], completion_only_loss=True,
        gradient_checkpointing=False, bf16=cfg["precision"] == "bf16", use_cpu=not torch.cuda.is_available(),
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
    )

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.t0 = 0.0
            self.seconds: list[float] = []
            self.losses: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.seconds.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    timer = StepTimer()
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(read_jsonl(cfg["train"])),
        eval_dataset=Dataset.from_list(read_jsonl(cfg["eval"])), processing_class=tokenizer,
        peft_config=lora, callbacks=[timer],
    )
    collate = trainer.data_collator
    counts: list[dict[str, int]] = []
    training = [True]  # eval batches after training are not counted

    def counting_collator(examples):
        batch = collate(examples)
        if training[0]:
            counts.append({
                "trained": int((batch["labels"][:, 1:] != -100).sum()),
                "real": int(batch["attention_mask"].sum()),
                "padded": int(batch["input_ids"].numel()),
            })
        return batch

    trainer.data_collator = counting_collator
    trainer.train()
    training[0] = False
    own_eval = trainer.evaluate()["eval_loss"]
    trainer.save_model(cfg["adapter_dir"])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # the same measure as mlxtune's torch backend: allocated CUDA memory on a GPU, else peak RSS
    peak = int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else rss
    steps = [{"seconds": s, "loss": loss, **c} for s, loss, c in zip(timer.seconds, timer.losses, counts)]
    Path(out_path).write_text(json.dumps({
        "steps": steps, "eval_loss_own": own_eval, "peak_framework": peak, "peak_rss": rss,
        "settings": {k: str(v) for k, v in args.to_dict().items() if k in (
            "optim", "bf16", "gradient_checkpointing", "max_length", "completion_only_loss", "padding_free",
            "packing", "pad_to_multiple_of", "group_by_length", "dataloader_num_workers", "torch_compile")},
    }, indent=1))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python bench/trl_sft.py CONFIG.json RESULT.json (written by bench/train_bench.py)")
    main(sys.argv[1], sys.argv[2])
