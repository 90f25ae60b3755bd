"""Reliability (issue 17): every cheap problem reported at once before anything loads, one run per output folder,
full disks, non-finite numbers, SIGTERM / Ctrl-C, SIGKILL at random points, a dying torchrun process.

Runs that get killed run in forked copies of this process (cheap: torch is already imported), one CPU thread
each, and so do the runs they are compared with bit for bit.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import yaml
from helpers_cli import adapter_tensors, tiny_llama_dir, tiny_run_config, toy_classification, write_jsonl

import loramix
from loramix import LoramixError, MixLoraConfig, MixLoraModel
from loramix.cli import main
from loramix.convert.export import export_moe
from loramix.io import atomic, checkpoint as ckpt
from loramix.io.lock import FolderLock, lock_path
from loramix.runconfig import build_run_config, load_run_config
from loramix.training import distributed
from loramix.training.trainer import train

from conftest import randomize_adapter, tiny_model

STEPS = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    return types.SimpleNamespace(root=root, model=tiny_llama_dir(root / "model"),
                                 data=toy_classification(root / "toy.jsonl"))


def _config(setup, out: Path, **train_kw) -> Path:
    """A run config file for a 6-step run into ``out`` (a checkpoint every step, the last two kept)."""
    raw = tiny_run_config(setup.model, setup.data, out, **{"max_steps": STEPS, "save_steps": 1, **train_kw})
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


class Child:
    """``main(argv)`` (the loramix command) in a forked copy of this process, stderr into ``stderr``.
    ``hook(notify)``, run in the child first, may patch it to call ``notify()`` at a point: the child then
    tells the parent and waits to be killed."""

    def __init__(self, argv: list[str], stderr: Path, hook=None) -> None:
        ready_r, ready_w = os.pipe()
        self.stderr = stderr
        self.status: int | None = None
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                os.close(ready_r)
                os.dup2(os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
                sys.stderr = open(2, "w", buffering=1, closefd=False)  # pytest has its own sys.stderr
                torch.set_num_threads(1)
                if hook is not None:
                    hook(lambda: (os.write(ready_w, b"!"), time.sleep(120)))
                code = main(argv)
            except BaseException as e:  # noqa: BLE001 (reported through the exit code and stderr)
                print(f"child failed: {e!r}", file=sys.stderr)
            finally:
                sys.stderr.flush()
                os._exit(code)
        os.close(ready_w)
        self.ready = ready_r

    def at_point(self, timeout: float = 120) -> bool:
        """Wait until the child reached its hook's point (False: it ended first)."""
        readable, _, _ = select.select([self.ready], [], [], timeout)
        return bool(readable) and os.read(self.ready, 1) == b"!"

    def alive(self) -> bool:
        if self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            self.status = status if pid else None
        return self.status is None

    def wait(self) -> int:
        if self.status is None:
            self.status = os.waitpid(self.pid, 0)[1]
        if self.ready is not None:
            os.close(self.ready)
            self.ready = None
        return os.waitstatus_to_exitcode(self.status)

    def kill(self) -> int:
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        return self.wait()

    def errors(self) -> list[str]:
        return self.stderr.read_text().splitlines()


def _run(argv: list[str], stderr: Path, hook=None) -> tuple[int, list[str]]:
    child = Child(argv, stderr, hook)
    code = child.wait()
    return code, child.errors()


def _train(config: Path, *extra: str) -> tuple[int, list[str]]:
    return _run(["train", str(config), *extra], config.with_suffix(".err"))


@pytest.fixture(scope="module")
def reference(setup):
    """The uninterrupted run's adapter."""
    out = setup.root / "reference"
    code, err = _train(_config(setup, out))
    assert code == 0, err
    return adapter_tensors(out / "adapter")


def _same(adapter_dir: Path, tensors: dict) -> bool:
    found = adapter_tensors(adapter_dir)
    return found.keys() == tensors.keys() and all(torch.equal(found[k], tensors[k]) for k in found)


def _logged_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]


def _no_leftovers(out: Path) -> bool:
    """No temporary folder or file, no lock file."""
    names = os.listdir(out) + os.listdir(out.parent)
    return not any(n.startswith(".tmp-") for n in names) and not os.path.exists(lock_path(str(out)))


def _never_loads(monkeypatch):
    """Loading a model or tokenizer fails the test: validation must come first."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the input was validated")
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", refuse)


# ---- 1. every cheap problem at once, before anything loads ---------------------------------------------------
def test_train_reports_every_config_and_data_problem_in_one_pass(setup, tmp_path, monkeypatch, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a", "label": "x"}, {"label": "y"}])
    raw = tiny_run_config(setup.model, setup.data, tmp_path / "out")
    raw["adapter"].update(num_expert=4, top_k=9)
    raw["train"].update(learning_rate=float("nan"), warmup_ratio=2)
    raw["data"]["datasets"] += [{"path": str(bad)}, {"path": str(tmp_path / "missing.jsonl")}]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    _never_loads(monkeypatch)
    assert main(["train", str(path)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert all(line.startswith(f"loramix: error: {path}: ") for line in lines), lines
    expected = ["adapter: unknown key 'num_expert'; did you mean 'num_experts'?",
                "adapter: config field 'top_k' (9) must not exceed 'num_experts' (4)",
                "train.learning_rate: must be a finite number, found nan",
                "train.warmup_ratio: must be <= 1, found 2.0",
                f"data.datasets[1]: {bad}:2: missing field 'text' (or 'question'/'sentence')",
                f"data.datasets[2]: {tmp_path / 'missing.jsonl'}: no such file"]
    assert [line.split(f"{path}: ", 1)[1] for line in lines] == expected


def test_api_config_loaders_collect_every_problem(tmp_path):
    with pytest.raises(LoramixError) as info:
        MixLoraConfig(r=0, lora_alpha=float("inf"), num_experts=2, top_k=3, jitter_noise=-1)
    assert info.value.lines == ["config field 'r' must be >= 1, got 0",
                                "config field 'lora_alpha' must be a finite number, got inf",
                                "config field 'top_k' (3) must not exceed 'num_experts' (2)",
                                "config field 'jitter_noise' must be >= 0, got -1"]
    path = tmp_path / "c.yaml"
    path.write_text("model: {name_or_path: m, dtype: float8}\nadapter: {type: lora, r: 0, lora_alhpa: 8}\n"
                    "train: {epochs: .inf, seed: -1, save_total_limit: 0}\n")
    with pytest.raises(LoramixError) as info:
        load_run_config(str(path))
    assert info.value.lines == [
        f"{path}: model.dtype: must be one of float32, bfloat16, float16, fp32, bf16, fp16, found 'float8'",
        f"{path}: adapter: unknown key 'lora_alhpa'; did you mean 'lora_alpha'?",
        f"{path}: adapter: config field 'r' must be >= 1, got 0",
        f"{path}: train.epochs: must be a finite number, found inf",
        f"{path}: train.seed: must be >= 0, found -1",
        f"{path}: train.save_total_limit: must be >= 1, found 0"]


def test_a_data_file_reports_its_first_bad_records_and_counts_the_rest(tmp_path):
    from loramix.data import load_examples
    from loramix.runconfig import DatasetSpec

    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "i", "output": "o"}] + [{"instruction": "i"}] * 7)
    with pytest.raises(LoramixError) as info:
        load_examples(DatasetSpec(path=str(path)))
    assert info.value.lines == [f"{path}:{n}: missing field 'output' (found: instruction)" for n in range(2, 7)] \
        + [f"{path}: 2 more records with problems"]


def test_eval_generate_and_export_check_every_argument_before_loading(setup, tmp_path, monkeypatch, capsys):
    _never_loads(monkeypatch)
    missing = str(tmp_path / "none")
    assert main(["eval", "--model", missing, "--adapter", missing, "--data", missing, "--limit", "0",
                 "--device", "gpu0"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "loramix: error: --limit must be >= 1, got 0",
        f"loramix: error: model.name_or_path: {missing}: no such model folder",
        f"loramix: error: {missing}: no such adapter folder",
        "loramix: error: device 'gpu0' is not a device name (auto, cpu, cuda, cuda:N)",
        f"loramix: error: {missing}: no such file"]
    assert main(["generate", "--model", str(setup.model), "--template", "alpacca", "--max-new-tokens", "0",
                 "--temperature", "nan", "--top-p", "2"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "loramix: error: no prompt: pass --prompt TEXT or --prompt-file FILE",
        "loramix: error: --template 'alpacca': unknown template (allowed: alpaca, plain, chat)",
        "loramix: error: --max-new-tokens must be >= 1, got 0",
        "loramix: error: --temperature must be a finite number > 0, got nan",
        "loramix: error: --top-p must be in (0, 1], got 2.0"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("taken")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "MIXLORA", "num_experts": 2, "top_k": 3}')
    assert main(["export", "--model", str(setup.model), "--adapter", str(adapter), "--max-shard-size", "5XB",
                 str(out)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"loramix: error: {adapter / 'adapter_config.json'}: config field 'top_k' (3) must not exceed "
        "'num_experts' (2)",
        f"loramix: error: output folder {out} is not empty (--overwrite / overwrite=True replaces it)",
        "loramix: error: shard size '5XB' is not a size like '5GB', '500MB' or a byte count"]


# ---- 2. one run per output folder ------------------------------------------------------------------------------
def _hold_lock(folder: Path) -> int:
    """A forked process that holds ``folder``'s lock until killed; its pid."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            FolderLock(str(folder), what="training run").acquire()
            os.write(ready_w, b"!")
            time.sleep(120)
        finally:
            os._exit(0)
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"!"
    os.close(ready_r)
    return pid


def test_a_second_run_is_refused_and_a_dead_runs_lock_is_taken_over(setup, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = build_run_config(yaml.safe_load(_config(setup, out, max_steps=1).read_text()))
    holder = _hold_lock(out)
    _never_loads(monkeypatch)
    started = time.time()
    with pytest.raises(LoramixError, match=rf"{out} is in use by another training run \(pid {holder} on .*, "
                                           r"started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d: "):
        train(cfg, echo=lambda _: None)
    assert time.time() - started < 5 and not out.exists()
    os.kill(holder, signal.SIGKILL)
    os.waitpid(holder, 0)
    monkeypatch.undo()
    notes = []
    assert train(cfg, echo=notes.append).steps == 1
    assert any(f"taking over the lock of a training run that ended without releasing it (pid {holder} " in note
               and note.endswith("; no longer running)") for note in notes), notes
    assert _no_leftovers(out)


def test_export_into_a_folder_another_export_writes_is_refused(tmp_path):
    model = loramix.get_mixlora_model(tiny_model("llama"), MixLoraConfig(r=4, num_experts=2, top_k=1))
    out = tmp_path / "moe"
    holder = _hold_lock(out)
    try:
        with pytest.raises(LoramixError, match=rf"{out} is in use by another training run \(pid {holder} "):
            export_moe(model, out)
    finally:
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)
    export_moe(model, out)
    assert (out / "model.safetensors").is_file() and _no_leftovers(out)


# ---- 3. out of disk space ---------------------------------------------------------------------------------------
def _full_disk_on(monkeypatch, module, name: str, when) -> None:
    """``module.name`` (a writer) writes a few bytes and then fails with ENOSPC when ``when(path)``."""
    real = getattr(module, name)

    def writer(obj, path, *args, **kwargs):
        if when(str(path)):
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, path, *args, **kwargs)
    monkeypatch.setattr(module, name, writer)


@pytest.mark.parametrize("where, intact", [("checkpoint-3", "checkpoint-2"), ("adapter", f"checkpoint-{STEPS}")])
def test_a_full_disk_stops_training_with_one_line_and_resume_finishes_it(setup, reference, tmp_path, monkeypatch,
                                                                        where, intact):
    import loramix.io.adapter_folder as adapter_folder

    out = tmp_path / "run"
    config = _config(setup, out)
    _full_disk_on(monkeypatch, adapter_folder, "save_file", lambda path: f".tmp-{where}-" in path)
    code, err = _train(config)
    what = "the final adapter" if where == "adapter" else where
    assert code == 2 and err == [
        f"loramix: error: {out}: out of disk space while writing {what} (nothing partial was left); {intact} is "
        f"intact: free space and run again with loramix train {config} --resume"]
    assert ckpt.list_checkpoints(str(out))[-1][1].endswith(intact) and _no_leftovers(out)
    monkeypatch.undo()
    assert _train(config, "--resume")[0] == 0
    assert _same(out / "adapter", reference) and _logged_steps(out) == list(range(1, STEPS + 1))


def test_a_full_disk_while_logging_leaves_no_half_line(setup, tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = []

    class FullAfterTwoLines:
        def __getattr__(self, name):
            return getattr(os, name)

        def write(self, fd, data):
            calls.append(data)
            if len(calls) > 2:
                os.write(fd, data[:5])  # a short write, as on a full disk
                raise OSError(errno.ENOSPC, "No space left on device")
            return os.write(fd, data)
    monkeypatch.setattr(atomic, "os", FullAfterTwoLines())
    with pytest.raises(atomic.DiskFullError, match=rf"{out}: out of disk space while writing log.jsonl .*; "
                                                   "checkpoint-2 is intact: free space and run again with resume=True"):
        train(build_run_config(yaml.safe_load(_config(setup, out).read_text())), echo=lambda _: None)
    assert _logged_steps(out) == [1, 2]


@pytest.mark.parametrize("existing", [False, True])
def test_a_full_disk_during_an_export_changes_nothing(tmp_path, monkeypatch, existing):
    from loramix.io import model_folder

    model = loramix.get_mixlora_model(tiny_model("llama"), MixLoraConfig(r=4, num_experts=2, top_k=1))
    out = tmp_path / "moe"
    if existing:
        export_moe(model, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()} if existing else None
    _full_disk_on(monkeypatch, model_folder, "save_file", lambda path: True)
    unchanged = f"{out} is unchanged" if existing else f"nothing was written to {out}"
    with pytest.raises(atomic.DiskFullError) as info:
        export_moe(model, out, overwrite=True)
    assert info.value.lines == [f"{tmp_path}: out of disk space while writing the MixtralForCausalLM checkpoint "
                                f"(nothing partial was left); {unchanged}"]
    assert os.listdir(tmp_path) == (["moe"] if existing else [])
    if existing:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def _mount_tmpfs(folder: Path, size: int) -> bool:
    folder.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def test_a_really_full_tmpfs(setup, reference, tmp_path):
    """The real thing where this machine lets us mount a small tmpfs (root): torch.save's and safetensors'
    own errors on a full disk become the one line, and resume after freeing space finishes the run."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, 4 * 2**20):
        pytest.skip("cannot mount a tmpfs here (needs root); the monkeypatched full-disk tests cover the logic")
    try:
        out = disk / "run"
        config = _config(setup, out)
        checkpoint = setup.root / "reference" / f"checkpoint-{STEPS}"
        pages = sum(-(-p.stat().st_size // 4096) * 4096 for p in checkpoint.iterdir())
        free = shutil.disk_usage(disk).free
        (disk / "ballast").write_bytes(b"\0" * (free - pages * 3 // 2))  # room for one checkpoint, not two
        code, err = _train(config)
        assert code == 2 and len(err) == 1, err
        assert "out of disk space while writing" in err[0] and "checkpoint-1 is intact: free space and run " \
            f"again with loramix train {config} --resume" in err[0], err
        assert [s for s, _ in ckpt.list_checkpoints(str(out))] == [1] and _no_leftovers(out)
        (disk / "ballast").unlink()
        assert _train(config, "--resume")[0] == 0
        assert _same(out / "adapter", reference)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=30)


# ---- 4. non-finite numbers -------------------------------------------------------------------------------------
def _poison_step(monkeypatch, step: int, acc: int = 2) -> None:
    """The forward/backward of optimizer step ``step`` gives a NaN loss and NaN gradients."""
    real = distributed.DataParallel.forward_backward
    calls = []

    def forward_backward(self, model, shard, *, scale, sync):
        ce, aux = real(self, model, shard, scale=scale, sync=sync)
        calls.append(1)
        if (len(calls) - 1) // acc == step - 1:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
            return float("nan"), aux
        return ce, aux
    monkeypatch.setattr(distributed.DataParallel, "forward_backward", forward_backward)


def test_a_non_finite_step_stops_the_run_before_anything_is_written(setup, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _poison_step(monkeypatch, 3)
    with pytest.raises(LoramixError) as info:
        train(build_run_config(yaml.safe_load(_config(setup, out).read_text())), echo=lambda _: None)
    assert info.value.lines == [
        "step 3: the loss is nan and the gradient norm nan; the run stops before this update (checkpoint-2 is "
        "intact, nothing was written for this step): lower train.learning_rate, check the data, or set "
        "train.skip_nonfinite: true to skip such steps"]
    assert [s for s, _ in ckpt.list_checkpoints(str(out))] == [1, 2] and _logged_steps(out) == [1, 2]
    assert not (out / "adapter").exists()


def test_skip_nonfinite_skips_the_update_and_counts_it(setup, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _poison_step(monkeypatch, 3)
    raw = yaml.safe_load(_config(setup, out, skip_nonfinite=True, save_total_limit=None).read_text())
    result = train(build_run_config(raw), echo=lambda _: None)
    assert result.steps == STEPS and result.skipped_steps == 1
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in log] == [0, 0, 1, 1, 1, 1] and log[2]["loss"] is None
    at = {s: torch.load(os.path.join(p, ckpt.STATE_NAME), weights_only=False)["params"]
          for s, p in ckpt.list_checkpoints(str(out))}
    assert all(torch.equal(at[2][k], at[3][k]) for k in at[2])  # step 3 changed nothing
    assert not all(torch.equal(at[3][k], at[4][k]) for k in at[3])
    assert all(torch.isfinite(t).all() for t in adapter_tensors(out / "adapter").values())


def test_adapters_with_nan_are_neither_saved_nor_loaded(tmp_path, capsys, setup):
    from safetensors.torch import load_file, save_file

    model = loramix.get_mixlora_model(tiny_model("llama"), MixLoraConfig(r=4, num_experts=2, top_k=1))
    model.save_pretrained(tmp_path / "good")
    name = "model.layers.1.mlp.experts.up_proj.lora_B"
    with torch.no_grad():
        dict(model.trainable_parameters())[name][0, 0, 0] = float("inf")
    with pytest.raises(LoramixError, match=rf"{tmp_path / 'bad'}: adapter not saved: tensor '{name}' holds NaN or "
                                           "Inf values"):
        model.save_pretrained(tmp_path / "bad")
    assert not (tmp_path / "bad").exists() or not os.listdir(tmp_path / "bad")
    path = tmp_path / "good" / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors[name][1, 0, 0] = float("nan")
    save_file(tensors, path, metadata={"format": "pt", "model_type": "llama", "num_hidden_layers": "2"})
    with pytest.raises(LoramixError, match=rf"{path}: tensor '{name}' holds NaN or Inf values"):
        MixLoraModel.from_pretrained(tiny_model("llama"), tmp_path / "good")


# ---- 5. SIGTERM and Ctrl-C ---------------------------------------------------------------------------------------
def _at_micro_batch(n: int, then):
    """A Child hook: ``then()`` in the ``n``-th forward/backward (1-based)."""
    def hook(notify):
        real = distributed.DataParallel.forward_backward
        calls = []

        def forward_backward(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == n:
                then(notify)
            return real(self, *args, **kwargs)
        distributed.DataParallel.forward_backward = forward_backward
    return hook


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda sig: sig.name)
def test_a_signal_finishes_the_step_writes_a_checkpoint_and_resume_is_exact(setup, reference, tmp_path, sig):
    out = tmp_path / "run"
    config = _config(setup, out, save_steps=0)
    # mid-step: the first of step 3's two micro-batches
    code, err = _run(["train", str(config)], tmp_path / "err",
                     _at_micro_batch(5, lambda notify: os.kill(os.getpid(), sig)))
    assert code == 128 + sig and err == [
        f"loramix: interrupted: stopped by {sig.name} after step 3 of {STEPS}: checkpoint-3 is written; "
        f"continue with loramix train {config} --resume"]
    assert [s for s, _ in ckpt.list_checkpoints(str(out))] == [3] and _no_leftovers(out)
    assert _train(config, "--resume")[0] == 0
    assert _same(out / "adapter", reference)


def test_a_second_signal_stops_at_once(setup, tmp_path):
    out = tmp_path / "run"
    twice = _at_micro_batch(5, lambda notify: [os.kill(os.getpid(), signal.SIGINT) for _ in range(2)])
    code, err = _run(["train", str(_config(setup, out))], tmp_path / "err", twice)
    assert (code, err) == (130, ["loramix: interrupted"])
    assert [s for s, _ in ckpt.list_checkpoints(str(out))] == [1, 2]


# ---- 6. fault injection: SIGKILL at random points, then resume ----------------------------------------------------
def _kill_point(kind: str, step: int):
    """A Child hook that stops the run (until it is killed) at ``kind``: mid-step (after the first micro-batch of
    ``step``), mid-save of checkpoint ``step``'s trainer state, mid-save of the final adapter, or mid-rotation (an
    old checkpoint half deleted)."""
    def hook(notify):
        if kind == "step":
            _at_micro_batch(2 * step, lambda n: n())(notify)
        elif kind in ("save", "final"):
            target = f".tmp-checkpoint-{step}-" if kind == "save" else ".tmp-adapter-"
            module, name = (torch, "save") if kind == "save" else (sys.modules["loramix.io.adapter_folder"], "save_file")
            real = getattr(module, name)

            def writer(obj, path, *args, **kwargs):
                if target in str(path):
                    with open(path, "wb") as f:
                        f.write(b"half a file")
                    notify()
                return real(obj, path, *args, **kwargs)
            setattr(module, name, writer)
        else:
            real_rmtree = shutil.rmtree

            def rmtree(path, *args, **kwargs):
                if os.path.basename(path).startswith("checkpoint-"):
                    os.remove(os.path.join(path, "adapter_model.safetensors"))
                    notify()
                return real_rmtree(path, *args, **kwargs)
            shutil.rmtree = rmtree
    return hook


def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_adapter(setup, reference, tmp_path):
    """6 runs, each killed once (mid-step, mid-checkpoint-save, mid-final-adapter-save, mid-rotation, at a random
    moment, then one more of the first, second or last kind), at a seeded random step, and resumed."""
    rng = random.Random(17)
    kinds = []
    for i in range(6):
        kind = ["step", "save", "final", "rotate", "time"][i] if i < 5 else rng.choice(["step", "save", "time"])
        step = rng.randint(1, STEPS)
        out = tmp_path / f"run{i}"
        config = _config(setup, out)
        child = Child(["train", str(config)], tmp_path / f"err{i}", None if kind == "time" else _kill_point(kind, step))
        if kind == "time":  # a random moment after the first step
            while child.alive() and not (out / "log.jsonl").is_file():
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.5))
        else:
            assert child.at_point(), child.errors()
        child.kill()
        kinds.append((kind, step, [s for s, _ in ckpt.list_checkpoints(str(out))]))
        code, err = _train(config, "--resume")
        assert code == 0, (kinds[-1], err)
        assert _same(out / "adapter", reference), kinds[-1]
        assert _logged_steps(out) == list(range(1, STEPS + 1)) and _no_leftovers(out), kinds[-1]


# ---- 5b. torchrun: SIGTERM, a dying or a frozen process ------------------------------------------------------------
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is needed")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGSTOP], ids=lambda sig: sig.name)
def test_torchrun_processes_stop_together_or_soon_after_one_dies_or_freezes(setup, tmp_path, sig):
    """SIGTERM to torchrun (which passes it on): both processes finish the same step and write its checkpoint.
    SIGKILL to process 1: process 0's next collective fails at once. SIGSTOP to process 1 (alive, never
    answering): process 0 fails after train.collective_timeout_s (10 s here) instead of hanging."""
    out = tmp_path / "ddp"
    config = _config(setup, out, max_steps=400, save_steps=5, micro_batch_size=2, collective_timeout_s=10)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "loramix", "train", str(config)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while not (out / "checkpoint-5").is_dir():
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.2)
        ranks = {_environ(pid).get("RANK"): pid for pid in _children(proc.pid)}
        os.kill(proc.pid if sig == signal.SIGTERM else ranks["1"], sig)
        hit = time.time()
        while _running(ranks["0"]) and time.time() - hit < 90:
            time.sleep(0.1)
        took = time.time() - hit
        with contextlib.suppress(ProcessLookupError):  # a frozen one is ours to end
            os.kill(ranks["1"], signal.SIGKILL)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0 and took < 60, took
    if sig == signal.SIGTERM:
        stops = [line for line in output.splitlines() if line.startswith("loramix: interrupted: stopped by SIGTERM")]
        assert len(stops) == 2 and stops[0] == stops[1], output[-3000:]
        step = int(stops[0].split("after step ")[1].split()[0])
        assert ckpt.list_checkpoints(str(out))[-1][0] == step and f"checkpoint-{step} is written" in stops[0]
    else:
        assert "loramix: error: process 0: lost contact with the other processes during step " in output, \
            output[-3000:]
        assert "is intact: run again with loramix train" in output


def _running(pid: int) -> bool:
    """Whether ``pid`` is still running (not gone, not a zombie waiting for its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _children(parent: int) -> list[int]:
    """The processes whose parent is ``parent`` (torchrun's workers are its children)."""
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            found.append(int(name))
    return found


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


# ---- kept right: bad adapter files --------------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_in_a_reference_adapter_is_refused_without_running(tmp_path, capsys, setup):
    model = loramix.get_mixlora_model(tiny_model("llama"), MixLoraConfig(r=4, num_experts=2, top_k=1))
    randomize_adapter(model)
    model.save_pretrained(tmp_path / "a", format="moe-peft")
    marker = tmp_path / "pwned"
    torch.save({"x": _Payload(str(marker))}, tmp_path / "a" / "adapter_model.bin")
    with pytest.raises(LoramixError, match=r"adapter_model.bin: not a readable torch weights file \(Weights only "
                                           r"load failed"):
        MixLoraModel.from_pretrained(tiny_model("llama"), tmp_path / "a")
    assert not marker.exists()
