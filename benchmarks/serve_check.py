"""The serve check: a trained MixLoRA model in the real serving engines, against ``loramix generate``.

    bash benchmarks/serve_check.sh            # builds the engines' venvs, then runs this (make serve-check)
    python benchmarks/serve_check.py --side .serve-check [--adapter DIR] [--only vllm,llama-cpp]

Trains a small MixLoRA adapter on SmolLM2-135M-Instruct (the demo's data, a few steps; or takes --adapter),
exports it (``loramix export``: Mixtral, fp32; ``loramix export --to gguf``: GGUF f32, converted by
llama.cpp's own converter under its pinned transformers 4.57), and compares, on token-id prompts:

- greedy tokens of vLLM offline (``vllm.LLM``), vLLM's OpenAI server on 127.0.0.1 and llama.cpp (f16 and f32
  KV cache) with loramix's (the same prompts through the ``loramix generate`` command must print the
  same text);
- prompt log-probs (vLLM, fp32) and prompt logits (llama.cpp) with the MixLoRA model's.

Prints a table (and writes it with the raw numbers to WORK/serve_check.json); exits 1 on a mismatch.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import torch
import yaml

from loramix.data import Encoder, Example
from loramix.loading import load_model
from loramix.runconfig import ModelSpec
from loramix.tools.demo import demo_config, smollm2_path, write_demo_data

HERE = os.path.dirname(os.path.abspath(__file__))
ENGINES = ("vllm", "vllm-serve", "llama-cpp")
PROMPTS = (  # two of the demo's tasks as trained, and free text
    "Headline: The chef baked fresh bread.\nIs this about sports, food or weather?\nAnswer:",
    "Review: The hotel was lovely and the staff was superb.\nIs this review positive or negative?\nAnswer:",
    "The capital of France is",
    "Once upon a time, a little robot",
    "def fibonacci(n):",
)
# vLLM computes in fp32 like loramix; its kernels sum in another order (measured: 3e-5).
VLLM_LOGPROB_TOLERANCE = 1e-3


def log(msg: str) -> None:
    print(f"[serve-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list[str], *, timeout: float, env: dict | None = None, quiet: bool = False) -> float:
    """Run ``cmd`` (bounded by ``timeout`` seconds); its output streams unless ``quiet``; returns its wall time."""
    log(" ".join(cmd))
    start = time.time()
    done = subprocess.run(cmd, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": str(THREADS), **(env or {})},
                          stdout=subprocess.PIPE if quiet else None, stderr=subprocess.STDOUT if quiet else None,
                          text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"serve-check: failed (exit {done.returncode}): {' '.join(cmd)}\n{(done.stdout or '')[-3000:]}")
    return time.time() - start


def threads() -> int:
    """CPU threads per process: 1 on a machine whose load already fills its cores (OpenMP threads then spin
    against each other: a training step measured 5x slower with 2 threads than with 1), else all cores."""
    cores = os.cpu_count() or 1
    return 1 if os.getloadavg()[0] >= cores else cores


THREADS = threads()


def loramix_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "loramix", *args]


# ---- the model under test -----------------------------------------------------------------------------------
def train_adapter(work: str, base: str, steps: int) -> tuple[str, float]:
    """A MixLoRA adapter trained ``steps`` steps on the demo's data with ``loramix train``; (folder, seconds)."""
    paths = write_demo_data(os.path.join(work, "data"), n_train=200, n_test=20, seed=0)
    raw = demo_config(base, None, paths, work, steps=steps, seed=0)
    raw["data"]["eval"] = []
    shutil.rmtree(raw["train"]["output_dir"], ignore_errors=True)  # the check owns its run folder
    config = os.path.join(work, "train.yaml")
    with open(config, "w", encoding="utf-8") as fh:
        yaml.safe_dump(raw, fh, sort_keys=False)
    seconds = run(loramix_cmd("train", config), timeout=1800)
    return os.path.join(raw["train"]["output_dir"], "adapter"), seconds


def reference(base: str, adapter: str, max_tokens: int) -> dict:
    """loramix's own greedy tokens, prompt log-probs and prompt logits (fp32, CPU), one prompt at a time."""
    model, tokenizer = load_model(ModelSpec(name_or_path=base, dtype="float32"), adapter, device="cpu")
    encoder = Encoder(tokenizer)
    out = {"prompts": [], "tokens": [], "prompt_logprobs": [], "logits": [], "texts": []}
    start = time.time()
    with torch.inference_mode():
        for text in PROMPTS:
            ids = encoder.prompt_ids(Example(instruction=text, template="plain"))
            batch = torch.tensor([ids])
            logits = model(input_ids=batch).logits[0].double()  # [S, V]
            logprobs = torch.log_softmax(logits[:-1], dim=-1).gather(1, batch[0, 1:, None])[:, 0]
            generated = model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), do_sample=False,
                                       max_new_tokens=max_tokens, temperature=None, top_p=None, top_k=None,
                                       pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                                       eos_token_id=tokenizer.eos_token_id)[0, len(ids):].tolist()
            out["prompts"].append(ids)
            out["tokens"].append(generated)
            out["prompt_logprobs"].append(logprobs.tolist())
            out["logits"].append(logits.float().numpy())
            out["texts"].append(tokenizer.decode(generated, skip_special_tokens=True))
    out["seconds"] = time.time() - start
    out["eos"] = tokenizer.eos_token_id
    return out


def check_generate_command(base: str, adapter: str, work: str, ref: dict, max_tokens: int) -> bool:
    """``loramix generate`` on the same prompts prints the texts of the reference tokens."""
    prompt_file = os.path.join(work, "prompts.txt")
    with open(prompt_file, "w", encoding="utf-8") as fh:
        fh.writelines(p.replace("\n", "\\n") + "\n" for p in PROMPTS)
    done = subprocess.run(loramix_cmd("generate", "--model", base, "--adapter", adapter, "--prompt-file",
                                      prompt_file, "--max-new-tokens", str(max_tokens), "--device", "cpu"),
                          capture_output=True, text=True, timeout=900, check=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(THREADS)})
    printed = [block.split("### output\n", 1)[1].removesuffix("\n\n")
               for block in done.stdout.split("### prompt\n")[1:]]
    return printed == ref["texts"]


# ---- the engines --------------------------------------------------------------------------------------------
def engine_env(side: str) -> dict:
    """What the engine subprocesses get: offline, a small vLLM KV cache, two threads."""
    return {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "2", "OMP_NUM_THREADS": str(THREADS),
            "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HOME": os.path.join(side, "hf-home")}


def engine_run(python: str, engine: str, model: str, work: str, requests: str, side: str,
               *extra: str) -> dict:
    suffix = "npz" if engine == "llama-cpp" else "json"
    tag = "-".join((engine, *[e.strip("-") for e in extra]))
    out = os.path.join(work, f"result-{tag}.{suffix}")
    seconds = run([python, os.path.join(HERE, "serve_engines.py"), engine, "--model", model, "--requests", requests,
                   "--out", out, *extra], timeout=1800, env=engine_env(side))
    if suffix == "json":
        with open(out, encoding="utf-8") as fh:
            result = json.load(fh)
    else:
        data = np.load(out)
        result = json.loads(str(data["result"]))
        result["logits"] = [data[f"logits_{i}"] for i in range(len(result["tokens"]))]
    result["wall_s"] = seconds
    return result


def http_json(url: str, body: dict | None = None, timeout: float = 300) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        text = resp.read().decode()
    return json.loads(text) if text else {}


def vllm_serve(vllm_python: str, model: str, prompts: list[list[int]], max_tokens: int, port: int, side: str,
               work: str) -> dict:
    """vLLM's OpenAI server on 127.0.0.1 only: wait for /health (bounded), one completion per prompt, then stop it.

    Started as the module behind ``vllm serve``: vllm-cpu's ``vllm`` script asks for the version of a
    distribution named "vllm" and stops (PackageNotFoundError), its own being "vllm-cpu".
    """
    cmd = [vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "512", "--seed", "0"]
    log(" ".join(cmd))
    logfile = open(os.path.join(work, "vllm-serve.log"), "w", encoding="utf-8")
    start = time.time()
    server = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, env={**os.environ, **engine_env(side)},
                              start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:  # at most 15 minutes to come up
            if server.poll() is not None:
                sys.exit(f"serve-check: vllm serve exited ({server.returncode}); see {logfile.name}")
            if time.time() - start > 900:
                sys.exit(f"serve-check: vllm serve not healthy after 900 s; see {logfile.name}")
            try:
                urllib.request.urlopen(f"{base}/health", timeout=5).close()
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(3)
        loaded = time.time()
        tokens, logprobs = [], []
        for prompt in prompts:
            reply = http_json(f"{base}/v1/completions", {
                "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                "prompt_logprobs": 0, "return_token_ids": True})
            choice = reply["choices"][0]
            tokens.append(list(choice["token_ids"]))
            positions = choice["prompt_logprobs"][1:]
            logprobs.append([float(pos[str(tok)]["logprob"]) for tok, pos in zip(prompt[1:], positions)])
        return {"tokens": tokens, "prompt_logprobs": logprobs, "load_s": loaded - start,
                "run_s": time.time() - loaded, "wall_s": time.time() - start}
    finally:
        stop(server)
        logfile.close()


def stop(server: subprocess.Popen) -> None:
    """End the server's process group: SIGTERM, then SIGKILL after 60 s."""
    if server.poll() is not None:
        return
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


# ---- comparison ---------------------------------------------------------------------------------------------
def trim(tokens: list[int], eos: int) -> list[int]:
    """The continuation up to and including the first EOS (engines differ in whether they return it)."""
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def compare(name: str, ref: dict, got: dict, *, logprob_tolerance: float | None) -> dict:
    same = [trim(a, ref["eos"]) == trim(b, ref["eos"]) for a, b in zip(ref["tokens"], got["tokens"])]
    dlp = max(float(np.abs(np.array(a) - np.array(b)).max())
              for a, b in zip(ref["prompt_logprobs"], got["prompt_logprobs"]))
    row = {"engine": name, "same_tokens": f"{sum(same)}/{len(same)}", "max_dlogprob": dlp,
           "load_s": got.get("load_s"), "run_s": got.get("run_s"), "wall_s": got.get("wall_s")}
    if "logits" in got:
        row["max_dlogit"] = max(float(np.abs(a - b).max()) for a, b in zip(ref["logits"], got["logits"]))
    row["ok"] = all(same) and (logprob_tolerance is None or dlp <= logprob_tolerance)
    return row


def table(rows: list[dict]) -> str:
    def num(v, fmt):
        return "" if v is None else format(v, fmt)

    lines = ["| engine | greedy tokens = loramix | max abs Δ prompt log-prob | max abs Δ prompt logit | "
             "load s | generate s | ok |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['engine']} | {r['same_tokens']} | {num(r.get('max_dlogprob'), '.1e')} | "
                     f"{num(r.get('max_dlogit'), '.1e')} | {num(r.get('load_s'), '.0f')} | "
                     f"{num(r.get('run_s'), '.1f')} | {'yes' if r['ok'] else 'NO'} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", required=True, help="folder with vllm-venv, llama-venv and the llama.cpp sources")
    parser.add_argument("--work", help="scratch folder (default: SIDE/work)")
    parser.add_argument("--adapter", help="a MixLoRA adapter on SmolLM2-135M-Instruct (default: train one)")
    parser.add_argument("--steps", type=int, default=10, help="training steps when no --adapter")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--only", default=",".join(ENGINES), help=f"comma-separated subset of {', '.join(ENGINES)}")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--reuse-exports", action="store_true",
                        help="keep WORK/moe and WORK/moe-f32.gguf from an earlier run of the same adapter")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    log(f"{THREADS} CPU thread(s) per process (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    engines = [e for e in args.only.split(",") if e]
    if unknown := set(engines) - set(ENGINES):
        parser.error(f"--only: unknown engine(s) {', '.join(sorted(unknown))}")
    side = os.path.abspath(args.side)
    work = os.path.abspath(args.work or os.path.join(side, "work"))
    os.makedirs(work, exist_ok=True)
    base = smollm2_path()
    timings: dict[str, float] = {}

    adapter = args.adapter
    if adapter is None:
        adapter, timings["train"] = train_adapter(work, base, args.steps)
    moe = os.path.join(work, "moe")
    if not (args.reuse_exports and os.path.isfile(os.path.join(moe, "config.json"))):
        timings["export"] = run(loramix_cmd("export", "--model", base, "--adapter", adapter, "--dtype", "float32",
                                            "--overwrite", moe), timeout=1800)
    ref = reference(base, adapter, args.max_tokens)
    log(f"loramix greedy: {ref['texts']}")
    generate_ok = check_generate_command(base, adapter, work, ref, args.max_tokens)
    rows = [{"engine": "`loramix generate` (the command)", "same_tokens": "text " + ("equal" if generate_ok else
                                                                                    "DIFFERS"),
             "ok": generate_ok}]
    requests = os.path.join(work, "requests.json")
    with open(requests, "w", encoding="utf-8") as fh:
        json.dump({"prompts": ref["prompts"], "max_tokens": args.max_tokens}, fh)

    if "vllm" in engines:
        got = engine_run(os.path.join(side, "vllm-venv", "bin", "python"), "vllm", moe, work, requests, side)
        rows.append(compare("vLLM 0.32 offline `vllm.LLM`, fp32", ref, got,
                            logprob_tolerance=VLLM_LOGPROB_TOLERANCE))
    if "vllm-serve" in engines:
        got = vllm_serve(os.path.join(side, "vllm-venv", "bin", "python"), moe, ref["prompts"], args.max_tokens,
                         args.port, side, work)
        rows.append(compare("vLLM 0.32 OpenAI server (`vllm serve`'s module) on 127.0.0.1, fp32", ref, got,
                            logprob_tolerance=VLLM_LOGPROB_TOLERANCE))
    if "llama-cpp" in engines:
        gguf = os.path.join(work, "moe-f32.gguf")
        llama_python = os.path.join(side, "llama-venv", "bin", "python")
        converter = os.path.join(side, "src", "llama_cpp_python-0.3.36", "vendor", "llama.cpp")
        if not (args.reuse_exports and os.path.isfile(gguf)):
            timings["export_gguf"] = run(loramix_cmd(
                "export", "--model", base, "--adapter", adapter, "--to", "gguf", "--outtype", "f32", "--converter",
                converter, "--converter-python", llama_python, "--overwrite", gguf), timeout=1800)
        for kv in ("f16", "f32"):
            got = engine_run(llama_python, "llama-cpp", gguf, work, requests, side, "--kv-cache", kv)
            rows.append(compare(f"llama.cpp (llama-cpp-python 0.3.36), GGUF f32, {kv} KV cache", ref, got,
                                logprob_tolerance=None))
    rows[0]["run_s"] = ref["seconds"]
    print(table(rows))
    print("steps: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    with open(os.path.join(work, "serve_check.json"), "w", encoding="utf-8") as fh:
        json.dump({"rows": rows, "timings": timings, "reference_texts": ref["texts"],
                   "prompts": list(PROMPTS)}, fh, indent=2)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
