"""Training: determinism, exact resume, atomic checkpoints, optimizer groups, config validation."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import yaml
from helpers_cli import adapter_tensors, tiny_llama_dir, tiny_run_config, toy_classification

from loramix.io import checkpoint as ckpt
from loramix.errors import LoramixError
from loramix.runconfig import build_run_config, load_run_config
from loramix.training.trainer import make_optimizer, train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return tiny_llama_dir(root / "model"), toy_classification(root / "toy.jsonl")


def _run(setup, out, *, resume=False, **train_kw):
    model_dir, data = setup
    cfg = build_run_config(tiny_run_config(model_dir, data, out, **train_kw))
    return train(cfg, resume=resume, echo=lambda _: None)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_same_adapter_and_loss_goes_down(setup, tmp_path):
    r1 = _run(setup, tmp_path / "a", max_steps=6)
    r2 = _run(setup, tmp_path / "b", max_steps=6)
    assert _equal(adapter_tensors(r1.adapter_dir), adapter_tensors(r2.adapter_dir))
    r3 = _run(setup, tmp_path / "c", max_steps=6, seed=8)
    assert not _equal(adapter_tensors(r1.adapter_dir), adapter_tensors(r3.adapter_dir))
    log = [yaml.safe_load(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert log[-1]["loss"] < log[0]["loss"] and all(r["aux_loss"] > 0 for r in log)
    assert {"lr", "grad_norm", "epoch"} <= log[0].keys()


def test_resume_matches_uninterrupted_run_bitwise(setup, tmp_path, monkeypatch):
    full = _run(setup, tmp_path / "full", max_steps=6, save_steps=3)
    save_then_stop = ckpt.rotate

    def interrupt(out, keep):  # the run dies right after writing checkpoint-3
        save_then_stop(out, keep)
        raise KeyboardInterrupt
    monkeypatch.setattr(ckpt, "rotate", interrupt)
    with pytest.raises(KeyboardInterrupt):
        _run(setup, tmp_path / "half", max_steps=6, save_steps=3)
    monkeypatch.undo()
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path / "half"))] == [3]
    resumed = _run(setup, tmp_path / "half", resume=True, max_steps=6, save_steps=3)
    assert resumed.steps == 6
    assert _equal(adapter_tensors(full.adapter_dir), adapter_tensors(resumed.adapter_dir))
    log = [yaml.safe_load(x)["step"] for x in (tmp_path / "half" / "log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4, 5, 6]


def test_existing_run_needs_resume(setup, tmp_path):
    _run(setup, tmp_path / "r", max_steps=1)
    with pytest.raises(LoramixError, match="already holds a run; pass --resume"):
        _run(setup, tmp_path / "r", max_steps=1)


def test_checkpoints_rotate_and_are_complete(setup, tmp_path):
    _run(setup, tmp_path / "r", max_steps=4, save_steps=1, save_total_limit=2)
    found = ckpt.list_checkpoints(str(tmp_path / "r"))
    assert [s for s, _ in found] == [3, 4]
    assert sorted(os.listdir(found[-1][1])) == ["adapter_config.json", "adapter_model.safetensors",
                                                "run_config.yaml", "trainer_state.pt"]


def test_kill_9_mid_save_leaves_no_broken_checkpoint(tmp_path):
    script = textwrap.dedent(f"""
        import os, time
        from loramix.io.atomic import atomic_dir
        def write(tmp):
            open(os.path.join(tmp, "trainer_state.pt"), "wb").write(b"half")
            print("writing", flush=True)
            time.sleep(60)
        atomic_dir({str(tmp_path / 'checkpoint-5')!r}, write)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "checkpoint-5").exists()
    assert ckpt.list_checkpoints(str(tmp_path)) == []
    assert any(n.startswith(".tmp-") for n in os.listdir(tmp_path))
    ckpt.clean_partial(str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_atomic_dir_replaces_and_cleans_up_on_error(tmp_path):
    target = tmp_path / "adapter"
    ckpt.atomic_dir(str(target), lambda d: open(os.path.join(d, "a"), "w").write("1"))
    ckpt.atomic_dir(str(target), lambda d: open(os.path.join(d, "b"), "w").write("2"))
    assert os.listdir(target) == ["b"]

    def fail(d):
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        ckpt.atomic_dir(str(target), fail)
    assert os.listdir(target) == ["b"] and sorted(os.listdir(tmp_path)) == ["adapter"]


def test_loraplus_and_weight_decay_groups():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lora_A = torch.nn.Parameter(torch.zeros(2, 3))
            self.lora_B = torch.nn.Parameter(torch.zeros(3, 2))
            self.norm = torch.nn.Parameter(torch.zeros(3))
    cfg = build_run_config({"model": {"name_or_path": "x"},
                            "train": {"learning_rate": 1e-3, "loraplus_lr_ratio": 16, "weight_decay": 0.1}})
    groups = make_optimizer(M(), cfg.train).param_groups
    by = {(g["lr"], g["weight_decay"]): len(g["params"]) for g in groups}
    assert by == {(1e-3, 0.1): 1, (16e-3, 0.1): 1, (1e-3, 0.0): 1}


def test_gradient_checkpointing_gives_the_same_adapter(setup, tmp_path):
    plain = _run(setup, tmp_path / "a", max_steps=2)
    ckpt_run = _run(setup, tmp_path / "b", max_steps=2, gradient_checkpointing=True)
    a, b = adapter_tensors(plain.adapter_dir), adapter_tensors(ckpt_run.adapter_dir)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.parametrize("dispatch", ["dense", "grouped_mm"])
def test_every_moe_dispatch_trains_the_same_adapter(setup, tmp_path, dispatch):
    default = _run(setup, tmp_path / "a", max_steps=3)  # auto: grouped on CPU
    other = _run(setup, tmp_path / "b", max_steps=3, moe_dispatch=dispatch)
    a, b = adapter_tensors(default.adapter_dir), adapter_tensors(other.adapter_dir)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_bf16_run(setup, tmp_path):
    r = _run(setup, tmp_path / "r", max_steps=2, precision="bf16")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in adapter_tensors(r.adapter_dir).values())


def test_peft_lora_adapter_type_trains(setup, tmp_path):
    model_dir, data = setup
    raw = tiny_run_config(model_dir, data, tmp_path / "r", max_steps=2)
    raw["adapter"] = {"type": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    r = train(build_run_config(raw), echo=lambda _: None)
    assert (tmp_path / "r" / "adapter" / "adapter_config.json").is_file() and r.steps == 2


def test_config_errors(tmp_path):
    base = {"model": {"name_or_path": "m"}}
    with pytest.raises(LoramixError, match="train: unknown key 'learnig_rate'; did you mean 'learning_rate'"):
        build_run_config({**base, "train": {"learnig_rate": 1}})
    with pytest.raises(LoramixError, match="config: unknown section 'trian'; did you mean 'train'"):
        build_run_config({**base, "trian": {}})
    with pytest.raises(LoramixError, match="train.micro_batch_size: must be an integer"):
        build_run_config({**base, "train": {"micro_batch_size": "big"}})
    with pytest.raises(LoramixError, match="train.moe_dispatch: must be one of auto, grouped, grouped_mm, dense, "
                                           "per_expert, found 'sorted'"):
        build_run_config({**base, "train": {"moe_dispatch": "sorted"}})
    with pytest.raises(LoramixError, match="model.name_or_path is required"):
        build_run_config({"train": {}})
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name_or_path: m\ntrain:\n  learning_rate: 2e-4\n")
    cfg = load_run_config(str(path), ["train.learning_rate=1e-3", "train.max_steps=5"])
    assert cfg.train.learning_rate == 1e-3 and cfg.train.max_steps == 5
    assert load_run_config(str(path)).train.learning_rate == 2e-4  # "2e-4" (a YAML string) is read as a number
    path.write_text("model: [\n")
    with pytest.raises(LoramixError, match=r"c.yaml:\d+: malformed YAML"):
        load_run_config(str(path))
