"""Data-parallel training: 2 processes (torchrun, gloo on CPU) with batch b train the same adapter as 1 process
with batch 2b, with DDP and with FSDP; the loss share of each process equals the model's own loss; FSDP
checkpoints are whole; resume on the same and on another process count."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import types

import pytest
import torch
import yaml
from helpers_cli import adapter_tensors, tiny_llama_dir, tiny_run_config, toy_classification

from loramix import MixLoraModel
from loramix.data import collate
from loramix.nn.routing import TopKRouter
from loramix.training.distributed import DataParallel, RouterLoad, make_accelerator, predicted_tokens
from loramix.errors import LoramixError
from loramix.runconfig import build_run_config
from loramix.training.trainer import train

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")


def _config(model_dir, data, out, **train_kw) -> dict:
    raw = tiny_run_config(model_dir, data, out, max_steps=4, save_steps=2, save_total_limit=None, **train_kw)
    # No dropout (its masks come from per-process RNG streams) and a large router-loss weight, so that a wrong
    # reduction of the router loss across processes changes the adapter well beyond fp32 rounding.
    raw["adapter"].update(lora_dropout=0.0, router_aux_loss_coef=0.5)
    return raw


def _log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _close(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _torchrun(config: dict, path, *args: str) -> str:
    """``loramix train`` on 2 CPU processes by torchrun with ``config`` (written to ``path``); its stdout."""
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "loramix", "train", str(path), *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-process torchrun run (batch 3 each) and a 1-process run (batch 6) of the same config."""
    root = tmp_path_factory.mktemp("ddp")
    model_dir, data = tiny_llama_dir(root / "model"), toy_classification(root / "toy.jsonl", n=22)
    stdout = _torchrun(_config(model_dir, data, root / "two", micro_batch_size=3), root / "two.yaml")
    one = train(build_run_config(_config(model_dir, data, root / "one", micro_batch_size=6)), echo=lambda _: None)
    return types.SimpleNamespace(root=root, model_dir=model_dir, data=data, stdout=stdout, one=one)


def test_two_processes_train_the_adapter_of_one_process_with_twice_the_batch(runs):
    # 22 examples in global micro-batches of 6: the last of each epoch has 4 rows, 2 per process.
    two, one = runs.root / "two", runs.root / "one"
    assert _close(adapter_tensors(two / "adapter"), adapter_tensors(one / "adapter")) < 2e-6
    log2, log1 = _log(two), _log(one)
    assert [r["step"] for r in log2] == [1, 2, 3, 4]  # written once, by process 0
    for a, b in zip(log2, log1):  # loss, router loss and router load are of the whole global batch
        for key in ("loss", "aux_loss", "grad_norm", "router_balance"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    assert "(2 processes)" in runs.stdout and runs.stdout.count("adapter saved to") == 1
    assert sorted(os.listdir(two)) == ["adapter", "checkpoint-2", "checkpoint-4", "log.jsonl"]
    state = torch.load(two / "checkpoint-2" / "trainer_state.pt", weights_only=False)
    assert state["global_micro_batch"] == 6 and state["processes"] == 2 and len(state["rng_processes"]) == 2


def test_resume_a_two_process_checkpoint_on_one_process(runs, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(runs.root / "two", out)
    shutil.rmtree(out / "checkpoint-4")
    shutil.rmtree(out / "adapter")
    # The config still says micro_batch_size 3; the checkpoint's global micro-batch of 6 is kept.
    raw = _config(runs.model_dir, runs.data, out, micro_batch_size=3)
    resumed = train(build_run_config(raw), resume=True, echo=lambda _: None)
    assert resumed.steps == 4
    assert _close(adapter_tensors(out / "adapter"), adapter_tensors(runs.root / "one" / "adapter")) < 2e-6
    assert [r["step"] for r in _log(out)] == [1, 2, 3, 4]  # steps 3 and 4 of the first run are redone, logged once


def _fsdp_config(runs, out, **train_kw) -> dict:
    return _config(runs.model_dir, runs.data, out, micro_batch_size=3, fsdp=True, **train_kw)


@pytest.fixture(scope="module")
def fsdp(runs):
    """The 2-process run of ``runs`` under FSDP (with gradient checkpointing, as large bases train): its stdout."""
    return _torchrun(_fsdp_config(runs, runs.root / "fsdp", gradient_checkpointing=True), runs.root / "fsdp.yaml")


def _optimizer_tensors(checkpoint) -> tuple[list, dict]:
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)["optimizer"]
    return state["param_groups"], {f"{i}.{k}": v for i, s in state["state"].items() for k, v in s.items()}


def test_two_fsdp_processes_train_the_adapter_of_one_process_with_twice_the_batch(runs, fsdp):
    sharded, one = runs.root / "fsdp", runs.root / "one"
    assert "process 0 holds 50.0% of the parameters" in fsdp  # base and adapter sharded, not replicated
    assert _close(adapter_tensors(sharded / "adapter"), adapter_tensors(one / "adapter")) < 2e-6
    for a, b in zip(_log(sharded), _log(one)):
        for key in ("loss", "aux_loss", "grad_norm", "router_balance"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    assert sorted(os.listdir(sharded)) == ["adapter", "checkpoint-2", "checkpoint-4", "log.jsonl"]
    # Checkpoints hold the whole adapter and the whole AdamW state, in a one-process run's layout.
    groups, moments = _optimizer_tensors(sharded / "checkpoint-2")
    one_groups, one_moments = _optimizer_tensors(one / "checkpoint-2")
    assert groups == one_groups and _close(moments, one_moments) < 2e-6
    assert _close(adapter_tensors(sharded / "checkpoint-2"), adapter_tensors(one / "checkpoint-2")) < 2e-6


def test_fsdp_checkpoints_load_with_from_pretrained(runs, fsdp):
    from transformers import AutoModelForCausalLM

    for folder in ("checkpoint-2", "adapter"):
        model = MixLoraModel.from_pretrained(AutoModelForCausalLM.from_pretrained(runs.model_dir),
                                             runs.root / "fsdp" / folder)
        loaded = dict(model.trainable_parameters())
        assert _close(loaded, adapter_tensors(runs.root / "one" / folder)) < 2e-6, folder


def _interrupted(runs, tmp_path):
    """The FSDP run's folder as a run killed after checkpoint-2 leaves it."""
    out = tmp_path / "resumed"
    shutil.copytree(runs.root / "fsdp", out)
    shutil.rmtree(out / "checkpoint-4")
    shutil.rmtree(out / "adapter")
    return out


def test_resume_an_fsdp_checkpoint_on_one_process(runs, fsdp, tmp_path):
    out = _interrupted(runs, tmp_path)
    resumed = train(build_run_config(_fsdp_config(runs, out)), resume=True, echo=lambda _: None)  # 1 process: whole
    assert resumed.steps == 4
    assert _close(adapter_tensors(out / "adapter"), adapter_tensors(runs.root / "one" / "adapter")) < 2e-6
    assert [r["step"] for r in _log(out)] == [1, 2, 3, 4]


def test_resume_an_fsdp_checkpoint_on_two_fsdp_processes(runs, fsdp, tmp_path):
    out = _interrupted(runs, tmp_path)
    stdout = _torchrun(_fsdp_config(runs, out), tmp_path / "resume.yaml", "--resume")
    assert re.search(r"resuming from .*checkpoint-2 \(step 2 of 4\)", stdout)
    assert _close(adapter_tensors(out / "adapter"), adapter_tensors(runs.root / "one" / "adapter")) < 2e-6
    assert [r["step"] for r in _log(out)] == [1, 2, 3, 4]


def test_an_accelerate_fsdp_config_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch sets for distributed_type: FSDP
    with pytest.raises(LoramixError, match="set train.fsdp: true"):
        make_accelerator("fp32")


def _tiny_mixlora(tmp_path):
    from transformers import AutoModelForCausalLM

    from loramix import MixLoraConfig, get_mixlora_model

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir(tmp_path / "m"))
    torch.manual_seed(0)
    model = get_mixlora_model(base, MixLoraConfig(r=4, lora_alpha=8, num_experts=4, top_k=2, lora_dropout=0.0,
                                                  router_aux_loss_coef=0.3))
    with torch.no_grad():  # non-zero B so every adapter tensor gets a gradient
        for name, p in model.trainable_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def test_one_process_share_is_the_models_own_loss_and_gradient(tmp_path):
    model = _tiny_mixlora(tmp_path)
    features = [{"input_ids": list(range(5, 5 + n)), "labels": [-100] * m + list(range(5 + m, 5 + n))}
                for n, m in ((9, 3), (5, 4), (12, 2))]
    dp = DataParallel(make_accelerator("fp32"))
    shard = dp.shard(features, [2, 0, 1], pad_id=3)
    assert shard.predicted == 6 + 1 + 10 == sum(map(predicted_tokens, features))
    ce, aux = dp.forward_backward(model, shard, scale=1.0, sync=True)
    ours = {n: p.grad.clone() for n, p in model.trainable_parameters()}
    model.zero_grad()
    batch = collate([features[i] for i in (2, 0, 1)], 3)
    output = model(**batch)  # transformers' token-mean cross-entropy plus the model's router loss
    output.loss.backward()
    assert ce + aux == pytest.approx(output.loss.item(), rel=1e-6) and aux == pytest.approx(output.aux_loss.item())
    for name, p in model.trainable_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


def _process(rank: int, world: int) -> DataParallel:
    return DataParallel(types.SimpleNamespace(process_index=rank, num_processes=world, device=torch.device("cpu")))


def test_rows_split_a_global_batch_and_stand_in_rows_carry_no_loss():
    for n in (7, 8, 2):
        slices = [_process(r, 3).rows(n) for r in range(3)]
        assert [i for s in slices for i in s] == list(range(n))
        assert max(map(len, slices)) - min(map(len, slices)) <= 1
    features = [{"input_ids": [1, 5, 6, 7], "labels": [-100, -100, 6, 7]}, {"input_ids": [1, 8], "labels": [1, 8]}]
    shard = _process(0, 3).shard(features, [1, 0], pad_id=3)  # 2 rows for 3 processes: process 0 gets none
    assert shard.predicted == 3
    assert shard.batch["input_ids"].tolist() == [[1, 8]] and (shard.batch["labels"] == -100).all()
    assert (shard.token_mask == 0).all()


def test_router_load_balance():
    load = RouterLoad()
    top1 = TopKRouter(4, 4, top_k=1, init_range=0.02)
    balanced = torch.eye(4).repeat(2, 1)  # 8 tokens, top-1: two per expert
    load.add([top1.route(z).with_token_mask(torch.ones(8)) for z in (balanced, torch.eye(4)[[0] * 8])])
    assert load.summary() == {"router_balance": pytest.approx(0.5)}  # layer 0 even (1), layer 1 one expert (0)
    assert load.summary() == {}
    load.add([top1.route(balanced).with_token_mask(torch.tensor([1, 1, 1, 1, 0, 0, 0, 0]))])  # masked: not counted
    assert load.summary()["router_balance"] == pytest.approx(1.0)


def test_resume_keeps_the_checkpoints_global_batch(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    state = tmp_path / "checkpoint-3" / "trainer_state.pt"
    torch.save({"global_micro_batch": 6, "rng_processes": [None, None]}, state)
    process = _process(0, 3)
    assert process.global_micro_batch(str(tmp_path), False, 4) == 12
    assert process.global_micro_batch(str(tmp_path), True, 4) == 6
