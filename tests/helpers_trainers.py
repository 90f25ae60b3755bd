"""transformers' Trainer on a tiny MixLoRA model, as tests/test_trainers.py runs it: in the test process, or as
a script under ``accelerate launch`` (``python helpers_trainers.py MODEL_DIR OUT_DIR``: 2 rows per process)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers_cli import byte_tokenizer  # noqa: E402

ADAPTER = dict(r=4, lora_alpha=8, num_experts=4, top_k=2, lora_dropout=0.0, router_aux_loss_coef=0.5)


# The DDP test's runs: plain SGD, whose update is the gradient itself (Adam's normalised update would let
# fp32 rounding in near-zero gradients dominate the comparison).
DDP_RUN = dict(save_steps=4, optim="sgd", learning_rate=0.5)


def mixlora_model(model_dir: Path, **adapter):
    """The tiny LLaMA in ``model_dir`` with a fresh MixLoRA adapter (seeded; non-zero B so every tensor learns)."""
    from transformers import AutoModelForCausalLM

    from loramix import MixLoraConfig, get_mixlora_model

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = get_mixlora_model(base, MixLoraConfig(**{**ADAPTER, **adapter}))
    with torch.no_grad():
        for name, param in model.trainable_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return model


def texts(n: int = 16) -> list[str]:
    """Sentences of different lengths, so batches are padded and micro-batches carry different token counts."""
    return [f"n{i} is {'even' if i % 2 == 0 else 'odd'}" + "!" * (i % 5) for i in range(n)]


def tokenized(n: int = 16):
    from datasets import Dataset

    tokenizer = byte_tokenizer()
    return Dataset.from_dict({"text": texts(n)}).map(lambda b: tokenizer(b["text"]), batched=True,
                                                     remove_columns=["text"])


def training_args(out: Path, **overrides):
    """Plain TrainingArguments for a few CPU steps; batches in data order (so runs can be compared row by row)."""
    from transformers import TrainingArguments

    kw = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2,
              logging_steps=1, save_steps=2, report_to=[], use_cpu=True, train_sampling_strategy="sequential",
              disable_tqdm=True, seed=3)
    kw.update(overrides)
    return TrainingArguments(**kw)


def trainer(model, out: Path, callbacks=None, **overrides):
    from transformers import DataCollatorForLanguageModeling, Trainer

    tokenizer = byte_tokenizer()
    return Trainer(model=model, args=training_args(out, **overrides), train_dataset=tokenized(),
                   data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), processing_class=tokenizer,
                   callbacks=callbacks)


if __name__ == "__main__":
    from loramix.training.callbacks import RouterLossCallback

    model_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    run = trainer(mixlora_model(model_dir), out, callbacks=[RouterLossCallback()], **DDP_RUN)
    run.train()
    run.save_model(str(out / "final"))
    if run.is_world_process_zero():
        import json

        (out / "log.json").write_text(json.dumps(run.state.log_history))
