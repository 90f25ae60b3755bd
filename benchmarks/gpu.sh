#!/usr/bin/env bash
# The GPU table of benchmarks/README.md ("GPU at 7B widths"): MixLoRA against PEFT LoRA at the layer shapes of
# LLaMA-2-7B, Llama-3-8B and Qwen2.5-7B (4 layers each), bf16, batches 4 x 512 and 8 x 1024, training step,
# prefill, KV-cache decoding (batch 8, 128 new tokens; timed once per preset, at 4 x 512) and peak step
# memory, every variant interleaved in one process per run. Then one profile and one --compile run.
#
#     benchmarks/gpu.sh [RESULTS_DIR]      # default benchmarks/results/gpu; also copied to $OUT when set
#
# Sized for one H200 in 6 minutes: the runs share a deadline (BUDGET_S, default 345 s) and a run that
# would start with under 20 s left is skipped (and said so). Run the GPU parity tests first:
#     LORAMIX_TEST_DEVICE=cuda python -m pytest -q -p no:cacheprovider tests/test_fast_path.py -k "parity or decode or checkpointing or dropout or cuda"
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
results=${1:-benchmarks/results/gpu}
mkdir -p "$results"
deadline=$((SECONDS + ${BUDGET_S:-345}))
variants=peft-lora,mixlora-grouped_mm,mixlora-dense,mixlora-grouped
common=(--device cuda --dtype bf16 --threads 0 --warmup 2 --reps 8 --decode-reps 2)

bench() {  # bench NAME LIMIT_S ARGS...: one loramix bench run, its JSON in $results/NAME.json
  local name=$1 limit=$2 left=$((deadline - SECONDS))
  shift 2
  if ((left < 20)); then
    echo "gpu.sh: skipped $name (${left}s of the budget left)" | tee -a "$results/skipped.txt"
    return 0
  fi
  ((limit < left)) || limit=$left
  echo "gpu.sh: $name (limit ${limit}s)"
  timeout "$limit" python -m loramix bench "${common[@]}" "$@" --output "$results/$name.json" > /dev/null \
    || echo "gpu.sh: $name failed or ran out of time (exit $?)" | tee -a "$results/skipped.txt"
}

python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
for preset in llama2-7b llama3-8b qwen2.5-7b; do
  bench "${preset}_4x512" 90 --preset "$preset" --batch 4 --seq 512 --variants "$variants"
done
for preset in llama2-7b llama3-8b qwen2.5-7b; do
  bench "${preset}_8x1024" 60 --preset "$preset" --batch 8 --seq 1024 --new-tokens 0 --variants "$variants"
done
bench llama2-7b_4x512_profile 60 --preset llama2-7b --batch 4 --seq 512 --new-tokens 0 --reps 2 \
  --variants peft-lora,mixlora-grouped_mm --profile 2> "$results/llama2-7b_4x512_profile.txt"
bench llama2-7b_4x512_compile 90 --preset llama2-7b --batch 4 --seq 512 --variants peft-lora,mixlora-grouped_mm --compile

python benchmarks/table.py "$results"/*.json | tee "$results/table.md"
if [[ -n "${OUT:-}" ]]; then cp -r "$results" "$OUT/"; fi
