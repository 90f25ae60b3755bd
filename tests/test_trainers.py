"""transformers' Trainer and TRL's SFTTrainer with a MixLoraModel as ``model=``, as users write them
(docs/trainers.md): the loss they optimise is cross-entropy plus the router loss, checkpoints hold the adapter only
and load with MixLoraModel.from_pretrained, resuming reaches the uninterrupted adapter, activation checkpointing
changes nothing, and 2 DDP processes under ``accelerate launch`` train the adapter of one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers_cli import adapter_tensors, byte_tokenizer, tiny_llama_dir
from helpers_trainers import DDP_RUN, mixlora_model, texts, trainer
from transformers import AutoModelForCausalLM

from loramix import LoramixError, MixLoraModel
from loramix.training.callbacks import RouterLossCallback

HERE = Path(__file__).resolve().parent
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
TRAINER_STATE = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_llama_dir(tmp_path_factory.mktemp("trainers") / "model")


def _adapter(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.trainable_parameters()}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@torch.no_grad()
def _step_loss(model, batches: list[dict]) -> tuple[float, float, list[float]]:
    """(loss, cross-entropy, router losses) of one optimizer step over these micro-batches, from the logits: the
    next-token cross-entropy summed over all their predicted tokens divided by the number of those tokens, plus
    each micro-batch's router loss weighted by its share of the tokens."""
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    total, ce, auxes = 0.0, 0.0, []
    for batch, n in zip(batches, counts):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        ce_sum = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                 ignore_index=-100, reduction="sum")
        ce += float(ce_sum) / sum(counts)
        total += (float(ce_sum) + float(out.aux_loss) * n) / sum(counts)
        auxes.append(float(out.aux_loss))
    return total, ce, auxes


def _checkpoint(out: Path, step: int) -> Path:
    return out / f"checkpoint-{step}"


def test_trainer_optimises_cross_entropy_plus_the_router_loss_and_the_callback_logs_it(model_dir, tmp_path):
    model = mixlora_model(model_dir)
    run = trainer(model, tmp_path / "out", callbacks=[RouterLossCallback()], gradient_accumulation_steps=2,
                  max_steps=2, save_steps=2)
    # The first step's two micro-batches (rows 0-1 and 2-3, in data order), padded by the Trainer's collator.
    batches = [run.data_collator([run.train_dataset[i] for i in rows]) for rows in ((0, 1), (2, 3))]
    model.train()
    expected, ce, auxes = _step_loss(model, batches)
    assert expected - ce > 0.5  # router_aux_loss_coef 0.5: the router loss is a large part of the loss
    run.train()
    first = run.state.log_history[0]
    assert first["loss"] == pytest.approx(expected, rel=1e-5)
    assert first["aux_loss"] == pytest.approx(sum(auxes) / 2, rel=1e-5)
    assert all("aux_loss" in line for line in run.state.log_history if "loss" in line)


def test_checkpoints_hold_the_adapter_and_resume_to_the_uninterrupted_adapter(model_dir, tmp_path):
    # Dropout and shuffled batches: resuming must restore the RNG streams and skip the batches already seen.
    settings = dict(train_sampling_strategy="random", max_steps=4, save_steps=2)
    whole = mixlora_model(model_dir, lora_dropout=0.1)
    trainer(whole, tmp_path / "whole", **settings).train()
    for step in (2, 4):
        files = set(os.listdir(_checkpoint(tmp_path / "whole", step)))
        assert ADAPTER_FILES | TRAINER_STATE <= files
        assert not files & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}
    saved = adapter_tensors(_checkpoint(tmp_path / "whole", 4))
    assert _max_diff(saved, _adapter(whole)) == 0

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    loaded = MixLoraModel.from_pretrained(base, _checkpoint(tmp_path / "whole", 2))
    assert _max_diff(_adapter(loaded), adapter_tensors(_checkpoint(tmp_path / "whole", 2))) == 0
    assert _max_diff(_adapter(loaded), saved) > 1e-3  # two more steps moved the adapter

    resumed = mixlora_model(model_dir, lora_dropout=0.1)
    trainer(resumed, tmp_path / "resumed", **settings).train(
        resume_from_checkpoint=str(_checkpoint(tmp_path / "whole", 2)))
    assert _max_diff(_adapter(resumed), _adapter(whole)) <= 1e-6


def test_activation_checkpointing_trains_the_same_adapter(model_dir, tmp_path):
    adapters = []
    for checkpointing in (False, True):
        model = mixlora_model(model_dir, lora_dropout=0.1)  # the recompute must replay the dropout masks
        trainer(model, tmp_path / str(checkpointing), max_steps=2, gradient_checkpointing=checkpointing).train()
        assert model.base_model.is_activation_checkpointing == checkpointing
        adapters.append(_adapter(model))
    assert _max_diff(*adapters) <= 1e-6


def test_sft_trainer_with_a_tokenizer_and_a_text_dataset(model_dir, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = mixlora_model(model_dir)
    args = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=2, per_device_train_batch_size=2, logging_steps=1,
                     save_steps=2, learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True,
                     train_sampling_strategy="sequential", gradient_checkpointing=True,
                     bf16=False)  # TRL's default is bf16 autocast; fp32 here, to compare with the reference
    run = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts()}),
                     processing_class=byte_tokenizer())
    first_batch = run.data_collator([run.train_dataset[i] for i in (0, 1)])
    model.train()
    expected, _, (aux,) = _step_loss(model, [first_batch])
    run.train()
    first = run.state.log_history[0]
    assert first["loss"] == pytest.approx(expected, rel=1e-5)  # TRL's cross-entropy plus our router loss
    assert first["aux_loss"] == pytest.approx(aux, rel=1e-5)
    checkpoint = _checkpoint(tmp_path / "sft", 2)
    assert ADAPTER_FILES | TRAINER_STATE <= set(os.listdir(checkpoint))
    loaded = MixLoraModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), checkpoint)
    assert _max_diff(_adapter(loaded), _adapter(model)) == 0


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is needed")
def test_two_ddp_processes_under_accelerate_launch_train_the_adapter_of_one_process(model_dir, tmp_path):
    two = tmp_path / "two"
    # accelerate's torchrun launcher (named --multi_gpu) runs on CPU with gloo when there is no GPU.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(HERE / "helpers_trainers.py"), str(model_dir), str(two)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parent),
                                                                                os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # One process with 2 accumulated micro-batches of 2 rows sees, step by step, the rows the 2 processes see.
    model = mixlora_model(model_dir)
    one = trainer(model, tmp_path / "one", callbacks=[RouterLossCallback()], gradient_accumulation_steps=2,
                  **DDP_RUN)
    one.train()
    assert _max_diff(adapter_tensors(two / "final"), _adapter(model)) <= 1e-6
    log_two = [line for line in json.loads((two / "log.json").read_text()) if "loss" in line]
    log_one = [line for line in one.state.log_history if "loss" in line]
    assert [line["step"] for line in log_two] == [1, 2, 3, 4]
    for a, b in zip(log_two, log_one):
        for key in ("loss", "aux_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key


def test_save_pretrained_and_load_adapter_as_the_trainer_calls_them(model_dir, tmp_path):
    model = mixlora_model(model_dir)
    model.save_pretrained(tmp_path / "params")
    model.save_pretrained(tmp_path / "state", state_dict=model.state_dict())
    assert _max_diff(adapter_tensors(tmp_path / "params"), adapter_tensors(tmp_path / "state")) == 0
    model.save_pretrained(tmp_path / "other", is_main_process=False)
    assert not (tmp_path / "other").exists()

    fresh = mixlora_model(model_dir)
    with torch.no_grad():
        for _, p in fresh.trainable_parameters():
            p.zero_()
    fresh.load_adapter(tmp_path / "params", "default", is_trainable=True)
    assert _max_diff(_adapter(fresh), _adapter(model)) == 0
    assert all(p.requires_grad for _, p in fresh.trainable_parameters()) and fresh.training
    with pytest.raises(LoramixError, match="one adapter, 'default'"):
        fresh.load_adapter(tmp_path / "params", "second")
    mixlora_model(model_dir, lora_alpha=16).save_pretrained(tmp_path / "alpha16")
    with pytest.raises(LoramixError, match="lora_alpha is 16.*the model's adapter has 8"):
        fresh.load_adapter(tmp_path / "alpha16")
