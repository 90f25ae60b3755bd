"""lm-evaluation-harness on a base model + MixLoRA adapter, without exporting (docs/lm-eval.md): on a local
multiple-choice YAML task, lm-eval through loramix's model type and `loramix eval --harness lm-eval` give the
log-likelihood of every item and choice that lm-eval's `hf` model gives on the Mixtral export, and the choice
loramix's own log-likelihood scoring makes, hence the same accuracy."""
from __future__ import annotations

import importlib
import json
import sys

import pytest
import torch
from helpers_cli import byte_tokenizer, write_jsonl
from helpers_export import run_command, saved_base_and_adapter

from loramix import LoramixError
from loramix.commands import evaluate as evaluate_command
from loramix.convert.export import export_mixtral
from loramix.data import Encoder, load_examples
from loramix.evaluation.accuracy import predict
from loramix.runconfig import DatasetSpec

harness = pytest.importorskip("loramix.evaluation.harness", reason="lm-eval is not installed",
                              exc_type=LoramixError)
from lm_eval import simple_evaluate  # noqa: E402

LABELS = ("even", "odd")
# loramix's prompt for a {"text", "label"} classification file, written as an lm-eval task.
TASK_YAML = """task: parity
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Choose one of: even, odd.\\n{{{{text}}}}\\nAnswer:"
doc_to_choice: ["even", "odd"]
doc_to_target: label
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(base folder, adapter folder, MixLoRA model, data file, task folder): 30 items of a local task."""
    root = tmp_path_factory.mktemp("harness")
    base_dir, adapter_dir, model = saved_base_and_adapter(root)
    data = write_jsonl(root / "parity.jsonl", [{"text": f"{i * 7} is", "label": LABELS[i * 7 % 2]} for i in range(30)])
    (root / "tasks").mkdir()
    (root / "tasks" / "parity.yaml").write_text(TASK_YAML.format(data=data))
    return base_dir, adapter_dir, model, data, root / "tasks"


def _logliks(results: dict) -> list[list[float]]:
    """Per item (in data order), lm-eval's log-likelihood of each choice."""
    samples = sorted(results["samples"]["parity"], key=lambda s: s["doc_id"])
    return [[loglik for loglik, _ in s["filtered_resps"]] for s in samples]


def _assert_same_choices(lm_eval_logliks: list[list[float]], predictions) -> None:
    """lm-eval's log-likelihoods against loramix's scoring of the same items: loramix leaves out the tokens all
    choices share (the leading space, with this byte-level tokenizer), lm-eval counts them, so per item the two
    differ by one constant, the same for every choice."""
    gap = torch.tensor(lm_eval_logliks) - torch.tensor([p.loglik for p in predictions])
    torch.testing.assert_close(gap, gap[:, :1].expand_as(gap), rtol=0, atol=1e-4)


def _lm_eval(model: str, model_args: str, tasks_dir) -> dict:
    return simple_evaluate(model=model, model_args=model_args, tasks=["parity"], log_samples=True,
                           task_manager=harness.task_manager(["parity"], str(tasks_dir)))


def test_lm_eval_on_the_adapter_agrees_with_loramix_eval_and_with_the_export_item_by_item(setup, tmp_path):
    base_dir, adapter_dir, model, data, tasks_dir = setup
    through_loramix = _lm_eval("loramix", f"pretrained={base_dir},adapter={adapter_dir},device=cpu,dtype=float32",
                               tasks_dir)
    export_mixtral(model, tmp_path / "mixtral")
    on_export = _lm_eval("hf", f"pretrained={tmp_path / 'mixtral'},device=cpu,dtype=float32", tasks_dir)
    expected = torch.tensor(_logliks(on_export))
    torch.testing.assert_close(torch.tensor(_logliks(through_loramix)), expected, rtol=0, atol=1e-4)

    ours = predict(model, Encoder(byte_tokenizer()), load_examples(DatasetSpec(path=str(data), task="parity")))
    _assert_same_choices(_logliks(through_loramix), ours)
    accuracy = sum(p.loglik_pred == p.example.label for p in ours) / len(ours)
    assert 0 < accuracy < 1
    assert through_loramix["results"]["parity"]["acc,none"] == on_export["results"]["parity"]["acc,none"] == \
        pytest.approx(accuracy)

    bare = _lm_eval("loramix", f"pretrained={base_dir},device=cpu,dtype=float32", tasks_dir)
    assert (torch.tensor(_logliks(bare)) - expected).abs().max() > 0.1  # the adapter was attached


def test_loramix_eval_harness_command(setup, tmp_path, capsys):
    base_dir, adapter_dir, model, data, tasks_dir = setup
    out = tmp_path / "results.json"
    run_command(evaluate_command, ["eval", "--harness", "lm-eval", "--model", str(base_dir), "--adapter",
                                   str(adapter_dir), "--tasks", "parity", "--include-path", str(tasks_dir),
                                   "--limit", "10", "--output", str(out)])
    printed = capsys.readouterr().out
    assert f"adapter: {adapter_dir}" in printed and "|parity|" in printed
    written = json.loads(out.read_text())
    ours = predict(model, Encoder(byte_tokenizer()), load_examples(DatasetSpec(path=str(data), task="parity")))[:10]
    assert written["n-samples"]["parity"]["effective"] == 10
    assert written["results"]["parity"]["acc,none"] == pytest.approx(sum(p.loglik_pred == p.example.label
                                                                          for p in ours) / 10)
    _assert_same_choices(_logliks(written), ours)


def test_lm_eval_command_line_with_the_loramix_model_type(setup, tmp_path, monkeypatch):
    base_dir, adapter_dir, _, _, tasks_dir = setup
    monkeypatch.setattr(sys, "argv", [
        "lm-eval", "run", "--model", "loramix", "--model_args",
        f"pretrained={base_dir},adapter={adapter_dir},dtype=float32", "--device", "cpu", "--tasks", "parity",
        "--include_path", str(tasks_dir), "--limit", "4", "--output_path", str(tmp_path / "out")])
    harness.main()
    (written,) = (tmp_path / "out").rglob("results_*.json")
    assert json.loads(written.read_text())["n-samples"]["parity"]["effective"] == 4


def test_harness_errors_come_before_the_model_loads(setup, tmp_path, monkeypatch):
    _, _, _, data, tasks_dir = setup
    missing_model = ["--model", str(tmp_path / "no-model")]

    def run(*argv):
        run_command(evaluate_command, ["eval", *missing_model, *argv])

    with pytest.raises(LoramixError, match="unknown lm-eval task 'parit'; did you mean 'parity'"):
        run("--harness", "lm-eval", "--tasks", "parit", "--include-path", str(tasks_dir))
    with pytest.raises(LoramixError, match="no such folder of lm-eval task YAML files"):
        run("--harness", "lm-eval", "--tasks", "parity", "--include-path", str(tmp_path / "none"))
    with pytest.raises(LoramixError, match="needs --tasks"):
        run("--harness", "lm-eval")
    with pytest.raises(LoramixError, match="are for loramix's own tasks"):
        run("--harness", "lm-eval", "--tasks", "parity", "--data", str(data))
    with pytest.raises(LoramixError, match="add --harness lm-eval"):
        run("--tasks", "parity")
    with pytest.raises(LoramixError, match="not an adapter folder"):
        harness.MixLoraLM(pretrained=str(tmp_path / "no-model"), adapter=str(tmp_path))
    with pytest.raises(LoramixError, match="adapter=DIR, not peft="):
        harness.MixLoraLM(pretrained=str(tmp_path / "no-model"), peft=str(tmp_path))

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    monkeypatch.delitem(sys.modules, "loramix.evaluation.harness")
    with pytest.raises(LoramixError, match=r"lm-evaluation-harness is not installed: pip install 'loramix\[eval\]'"):
        importlib.import_module("loramix.evaluation.harness")
