"""The loramix command end to end (train -> eval -> inspect -> generate) and its handling of bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers_cli import COMMONSENSE, STORIES, byte_tokenizer, shared_or_skip, tiny_llama_dir, tiny_run_config, \
    toy_classification, write_jsonl

from loramix.cli import COMMANDS, main
from loramix.errors import LoramixError
from loramix.runconfig import load_run_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny model trained by `loramix train` on a commonsense slice (or a toy set without ../shared)."""
    root = tmp_path_factory.mktemp("cli")
    model = tiny_llama_dir(root / "model")
    data = COMMONSENSE / "boolq" / "train.json"
    raw = tiny_run_config(model, toy_classification(root / "toy.jsonl"), root / "run", max_steps=3, save_steps=2)
    if data.exists():
        raw["data"]["datasets"] = [{"path": str(data), "samples": 12, "task": "boolq"},
                                   {"path": str(COMMONSENSE / "piqa" / "test.json"), "samples": 12}]
        raw["data"]["eval"] = [{"path": str(COMMONSENSE / "boolq" / "test.json"), "limit": 6},
                               {"path": str(COMMONSENSE / "piqa" / "test.json"), "limit": 6}]
        raw["data"]["cutoff_len"] = 512
    cfg = root / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["train", str(cfg), "--set", "train.micro_batch_size=2"]) == 0
    return root, cfg, model


def test_train_writes_adapter_checkpoints_and_log(run):
    root, _, _ = run
    assert (root / "run" / "adapter" / "adapter_config.json").is_file()
    assert json.loads((root / "run" / "adapter" / "adapter_config.json").read_text())["peft_type"] == "MIXLORA"
    assert sorted(p.name for p in (root / "run").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert len((root / "run" / "log.jsonl").read_text().splitlines()) == 3


def test_eval_from_config_with_adapter_and_bare(run, capsys, tmp_path):
    root, cfg, _ = run
    out = tmp_path / "res.json"
    assert main(["eval", "--config", str(cfg), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "label acc" in printed and str(root / "run" / "adapter") in printed
    res = json.loads(out.read_text())
    tasks = set(res["results"]) - {"average"}
    assert res["adapter"].endswith("adapter") and len(tasks) >= 1
    assert main(["eval", "--config", str(cfg), "--adapter", "none", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["adapter"] is None


def test_eval_named_task_with_file(run, capsys):
    root, cfg, model = run
    path = shared_or_skip(COMMONSENSE / "winogrande" / "test.json")
    assert main(["eval", "--model", str(model), "--adapter", str(root / "run" / "adapter"),
                 "--task", f"winogrande={path}", "--limit", "4"]) == 0
    assert "winogrande" in capsys.readouterr().out


def test_inspect_writes_json_and_heatmap(run, tmp_path, capsys):
    _, cfg, _ = run
    assert main(["inspect", "--config", str(cfg), "--output-dir", str(tmp_path)]) == 0
    stats = json.loads((tmp_path / "router_stats.json").read_text())
    assert (tmp_path / "router_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert stats["num_experts"] == 4 and "all" in stats["tasks"]
    for task in stats["tasks"].values():
        assert len(task["layers"]) == 2
        for layer in task["layers"]:
            assert sum(layer["share"]) == pytest.approx(1.0)
            assert 0 <= layer["entropy"] <= stats["max_entropy"] + 1e-9
    assert "top expert per layer" in capsys.readouterr().out


def test_generate_greedy_is_repeatable_and_sampling_runs(run, capsys):
    _, cfg, _ = run
    args = ["generate", "--config", str(cfg), "--prompt", "Hello", "--prompt", "Is it true?", "--max-new-tokens", "5"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and first.count("### output") == 2
    assert main(args + ["--do-sample", "--temperature", "0.9", "--top-k", "20", "--seed", "1"]) == 0


def test_resume_after_finish_is_a_no_op(run):
    _, cfg, _ = run
    assert main(["train", str(cfg), "--set", "train.micro_batch_size=2", "--resume"]) == 0


def _error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("loramix: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_bad_input_is_one_line_and_exit_2(run, capsys, tmp_path):
    root, cfg, model = run
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "output": "b"}])
    bad.write_text(bad.read_text() + '{"instruction": oops}\n')
    assert "no such config file" in _error(capsys, ["train", str(tmp_path / "missing.yaml")])
    assert "bad.jsonl:2: malformed JSON line" in _error(capsys, ["train", str(cfg), "--set",
                                                                 f"data.datasets=[{{path: {bad}}}]"])
    nofield = write_jsonl(tmp_path / "nofield.jsonl", [{"instruction": "a"}])
    assert "nofield.jsonl:1: missing field 'output'" in _error(
        capsys, ["train", str(cfg), "--set", f"data.datasets=[{{path: {nofield}}}]"])
    (tmp_path / "empty.jsonl").write_text("")
    assert "the dataset is empty" in _error(
        capsys, ["eval", "--model", str(model), "--data", str(tmp_path / "empty.jsonl")])
    assert "unknown task 'hellaswagg'" in _error(capsys, ["eval", "--model", str(model), "--task", "hellaswagg"])
    assert "did you mean 'learning_rate'" in _error(capsys, ["train", str(cfg), "--set", "train.learnin_rate=1"])
    assert "no such file" in _error(capsys, ["eval", "--model", str(model), "--data", str(tmp_path / "none.jsonl")])
    assert "no prompt" in _error(capsys, ["generate", "--model", str(model)])
    assert "no such model folder" in _error(capsys, ["generate", "--model", "./no/such/model", "--prompt", "x"])
    assert "'gpu0' is not a device name" in _error(capsys, ["generate", "--model", str(model), "--prompt", "x",
                                                             "--device", "gpu0"])
    many = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU: never there
    assert f"device '{many}': no such CUDA device" in _error(capsys, ["generate", "--model", str(model), "--prompt", "x",
                                                                      "--device", many])


def test_incompatible_adapter_one_line(run, capsys, tmp_path):
    root, _, _ = run
    wide = tiny_llama_dir(tmp_path / "wide", hidden=64)
    toy = toy_classification(tmp_path / "toy.jsonl", n=4)
    err = _error(capsys, ["eval", "--model", str(wide), "--adapter", str(root / "run" / "adapter"), "--data", str(toy)])
    assert "does not fit this model" in err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(LoramixError):
        main(["--debug", "train", str(tmp_path / "missing.yaml")])
    with pytest.raises(LoramixError):
        main(["train", str(tmp_path / "missing.yaml"), "--debug"])


def test_python_dash_m_and_help():
    proc = subprocess.run([sys.executable, "-m", "loramix", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for name in ("train", "eval", "inspect", "generate", "demo"):
        assert name in proc.stdout
    assert COMMANDS[:5] == ("train", "evaluate", "inspect", "generate", "demo")


def test_real_model_stories260k(tmp_path, capsys):
    """One run on a real pretrained model (no HF tokenizer: a byte tokenizer stands in; its ids fit the vocab)."""
    stories = shared_or_skip(STORIES)
    byte_tokenizer().save_pretrained(tmp_path / "tok")
    data = toy_classification(tmp_path / "toy.jsonl", n=16)
    raw = tiny_run_config(stories, data, tmp_path / "run", max_steps=2)
    raw["model"]["tokenizer"] = str(tmp_path / "tok")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", str(tmp_path / "cfg.yaml")]) == 0
    assert main(["eval", "--config", str(tmp_path / "cfg.yaml")]) == 0
    assert "toy" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).resolve().parents[1] / "examples").glob("*.yaml")))
def test_example_configs_are_valid(name):
    cfg = load_run_config(str(Path(__file__).resolve().parents[1] / "examples" / name))
    assert cfg.data.datasets and cfg.train.output_dir.startswith("runs/")
