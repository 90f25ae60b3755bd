"""The engine side of the serve check: greedy tokens and prompt log-probs from vLLM or llama.cpp.

Runs inside an engine's own venv (no loramix import: those venvs pin their own torch / transformers):

    python serve_engines.py vllm --model EXPORT_DIR --requests req.json --out res.json
    python serve_engines.py llama-cpp --model FILE.gguf --requests req.json --out res.npz [--kv-cache f32]

``req.json``: ``{"prompts": [[token ids], ...], "max_tokens": N}``. Every prompt is given as token ids, so
the engines see exactly the tokens loramix saw. Output: for each prompt the greedy continuation (ids, stopping
at EOS like the others) and the log-probability of every prompt token after the first; llama.cpp also gives
its prompt logits ``[S, V]`` per prompt (``logits_<i>`` in the .npz), for the |Δlogit| against loramix.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def run_vllm(model: str, prompts: list[list[int]], max_tokens: int) -> dict:
    """vLLM offline (``vllm.LLM``), fp32, eager: one batch of token-id prompts, greedy."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.time()
    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=512, seed=0)
    loaded = time.time()
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, prompt_logprobs=0)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    tokens, logprobs = [], []
    for prompt, out in zip(prompts, outputs):
        tokens.append(list(out.outputs[0].token_ids))
        # prompt_logprobs[0] is None (nothing predicts the first token); then {token id: Logprob} per position
        logprobs.append([float(pos[tok].logprob) for tok, pos in zip(prompt[1:], out.prompt_logprobs[1:])])
    return {"tokens": tokens, "prompt_logprobs": logprobs, "load_s": loaded - start,
            "run_s": time.time() - loaded}


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def run_llama_cpp(model: str, prompts: list[list[int]], max_tokens: int, kv_cache: str) -> dict:
    """llama.cpp through llama-cpp-python: prompt logits, then greedy (argmax) decoding one token at a time."""
    import llama_cpp

    kv_type = {"f16": llama_cpp.GGML_TYPE_F16, "f32": llama_cpp.GGML_TYPE_F32}[kv_cache]
    start = time.time()
    llm = llama_cpp.Llama(model_path=model, n_ctx=512, n_batch=512, logits_all=True, verbose=False, seed=0,
                          type_k=kv_type, type_v=kv_type, n_threads=int(os.environ.get("OMP_NUM_THREADS", "2")))
    loaded = time.time()
    eos = llm.token_eos()
    tokens, logprobs, logits = [], [], {}
    for i, prompt in enumerate(prompts):
        llm.reset()
        llm.eval(prompt)
        prompt_logits = np.array(llm.scores[: len(prompt)], dtype=np.float32)  # [S, V]
        logits[f"logits_{i}"] = prompt_logits
        lp = log_softmax(prompt_logits[:-1])
        logprobs.append([float(lp[j, tok]) for j, tok in enumerate(prompt[1:])])
        out: list[int] = []
        next_logits = prompt_logits[-1]
        while len(out) < max_tokens:
            token = int(np.argmax(next_logits))
            out.append(token)
            if token == eos:
                break
            llm.eval([token])
            next_logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        tokens.append(out)
    return {"tokens": tokens, "prompt_logprobs": logprobs, "load_s": loaded - start,
            "run_s": time.time() - loaded, "logits": logits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("engine", choices=("vllm", "llama-cpp"))
    parser.add_argument("--model", required=True)
    parser.add_argument("--requests", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--kv-cache", choices=("f16", "f32"), default="f16", help="llama.cpp's KV cache type")
    args = parser.parse_args()
    with open(args.requests, encoding="utf-8") as fh:
        req = json.load(fh)
    if args.engine == "vllm":
        result = run_vllm(args.model, req["prompts"], req["max_tokens"])
    else:
        result = run_llama_cpp(args.model, req["prompts"], req["max_tokens"], args.kv_cache)
    logits = result.pop("logits", {})
    if args.out.endswith(".npz"):
        np.savez(args.out, result=np.array(json.dumps(result)), **logits)
    else:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(result, fh)


if __name__ == "__main__":
    main()
