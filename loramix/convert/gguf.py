"""GGUF for llama.cpp: an exported MoE checkpoint folder through llama.cpp's own ``convert_hf_to_gguf.py``.

The converter is not on PyPI as a package: it comes with a llama.cpp clone, and llama-cpp-python's sdist
vendors it (``vendor/llama.cpp``). It runs as a subprocess, with its own vendored ``gguf-py``, under a
Python that has its requirements (torch, numpy, transformers, sentencepiece, pyyaml).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

from ..errors import LoramixError

CONVERTER_NAME = "convert_hf_to_gguf.py"
# llama.cpp's --outtype choices that keep every weight usable by its MoE kernels.
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# What the converter imports beyond its own folder (sentencepiece lazily, but on every LLaMA-family vocab).
CONVERTER_MODULES = ("torch", "numpy", "transformers", "sentencepiece", "yaml")
# Export architectures llama.cpp runs (its qwen2moe graph requires a shared expert, which our Qwen2-MoE lacks).
LLAMA_CPP_ARCHITECTURES = ("mixtral", "qwen3_moe")


@dataclass(frozen=True)
class Converter:
    """llama.cpp's converter script and the Python that runs it."""

    script: str
    python: str

    def convert(self, hf_dir: str, out_file: str, *, outtype: str) -> None:
        """Convert the checkpoint folder ``hf_dir`` into ``out_file`` (``outtype``: one of OUTTYPES)."""
        cmd = [self.python, self.script, hf_dir, "--outfile", out_file, "--outtype", outtype]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # a local folder: nothing to fetch
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0 or not os.path.isfile(out_file):
            lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
            raise LoramixError(f"llama.cpp's converter failed on {hf_dir} (exit {done.returncode}): {lines[-1]}")


def find_converter(path: str | None, python: str | None = None) -> Converter:
    """The converter at ``path`` (the script, or a llama.cpp folder holding it), checked to run under ``python``
    (default: this interpreter): the one-line error here comes before any slow work."""
    hint = ("pass --converter with a llama.cpp clone, or with vendor/llama.cpp of llama-cpp-python's sdist "
            "(`pip download --no-deps --no-binary :all: llama-cpp-python`)")
    if not path:
        raise LoramixError(f"--to gguf needs llama.cpp's {CONVERTER_NAME}: {hint}")
    script = os.path.join(path, CONVERTER_NAME) if os.path.isdir(path) else path
    if not os.path.isfile(script) or os.path.basename(script) != CONVERTER_NAME:
        raise LoramixError(f"--converter {path}: no {CONVERTER_NAME} there; {hint}")
    python = python or sys.executable
    probe = "import importlib.util, sys; print(' '.join(m for m in sys.argv[1:] if not importlib.util.find_spec(m)))"
    try:
        done = subprocess.run([python, "-c", probe, *CONVERTER_MODULES], capture_output=True, text=True, check=False)
    except OSError as e:
        raise LoramixError(f"--converter-python {python}: cannot run it ({e.strerror})") from None
    missing = done.stdout.split()
    if done.returncode != 0 or missing:
        requirements = os.path.join(os.path.dirname(os.path.abspath(script)), "requirements",
                                    "requirements-convert_hf_to_gguf.txt")
        raise LoramixError(f"llama.cpp's converter needs {', '.join(missing) or 'a working Python'} in {python}: "
                           f"`pip install -r {requirements}` (or pip install {' '.join(missing)})")
    return Converter(os.path.abspath(script), python)


def check_llama_cpp_runs(model_type: str, architecture: str) -> None:
    """Refuse an export architecture (``model_type``, e.g. "qwen2_moe"; class name) llama.cpp cannot run."""
    if model_type not in LLAMA_CPP_ARCHITECTURES:
        raise LoramixError(f"--to gguf: this base exports to {architecture}, which llama.cpp cannot run (its "
                           f"{model_type} graph needs a shared expert); llama.cpp runs exports of llama, "
                           f"mistral and qwen3 bases")
