#!/usr/bin/env bash
# The accelerator memory check (issue 31), about 2 minutes on one H200, nothing from the network:
# a random 1.07B Llama (22 layers, hidden 2048, FFN 5632, 32 heads / 4 KV heads, SmolLM2's
# vocabulary of 49152), LoRA q,v r=8 + head, B8 S512, bf16 compute, ours against PEFT on the GPU:
# fp32 storage (PEFT: fp32 + bf16 autocast), bf16 storage on both sides, --remat full against
# PEFT's gradient checkpointing, NF4 (ours alone: no bitsandbytes) and --scan-layers (ours alone),
# each with XLA's memory account of our step; then the memory model against those peaks.
#
#   experiments/memory_check.sh OUT_DIR           # on the GPU machine: OUT_DIR/bench.json, .txt, memory_model_check.json
#   experiments/memory_check.sh OUT_DIR --tiny    # the same commands on a tiny Llama, PEFT on the CPU (a dry run)
#
# The model is made once under runs/llama-1.1b (or OUT_DIR/llama-tiny) with the tokenizer that
# `python experiments/bench_memory.py --save-tokenizer runs/smollm2-tokenizer` saved (3.4 MB: carry
# it where the gguf package is missing). PYTHON picks the interpreter (default python3).
set -euo pipefail
out=${1:?usage: experiments/memory_check.sh OUT_DIR [--tiny]}
mode=${2:-}
python=${PYTHON:-python3}
cd "$(dirname "$0")/.."
mkdir -p "$out"
if [[ $mode == --tiny ]]; then
  model=$out/llama-tiny device=cpu
  size=(--hidden 64 --layers 2 --intermediate 128 --heads 4 --kv-heads 2)
  run=(--batch 2 --seq-len 16 --steps 1 --rounds 1 --warmup 1)
elif [[ -z $mode ]]; then
  model=runs/llama-1.1b device=cuda
  size=(--hidden 2048 --layers 22 --intermediate 5632 --heads 32 --kv-heads 4)
  run=(--batch 8 --seq-len 512 --steps 6 --rounds 2 --warmup 2)
else
  echo "memory_check.sh: unknown option $mode (the only one is --tiny)" >&2
  exit 2
fi
tokenizer=()
if [[ -d runs/smollm2-tokenizer ]]; then tokenizer=(--tokenizer runs/smollm2-tokenizer); fi
if [[ ! -f $model/config.json ]]; then
  "$python" experiments/bench_memory.py --make-model "$model" "${size[@]}" "${tokenizer[@]}"
fi
XLA_PYTHON_CLIENT_PREALLOCATE=false "$python" experiments/bench.py --model "$model" "${run[@]}" --dtype bfloat16 \
  --eval-batches 0 --peer peft --peer-device "$device" --memory-account \
  --variant='--param-dtype bfloat16' --variant='--remat full' --variant='--quantize nf4' --variant='--scan-layers' \
  --json "$out/bench.json" > "$out/bench.txt"
cat "$out/bench.txt"
"$python" experiments/memory_model.py --check "$out/bench.json" --out "$out/memory_model_check.json"
