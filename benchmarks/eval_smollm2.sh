#!/usr/bin/env bash
# Final accuracy measurement on SmolLM2-135M (fp / W8A8 / O3); prints the table. See eval_smollm2.py.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${SQ2TRT_SMOLLM2:=build/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}"
: "${SQ2TRT_DATA:=../shared/data}"
export SQ2TRT_SMOLLM2 SQ2TRT_DATA
PYTHONPATH="$PWD" exec "${PYTHON:-python}" benchmarks/eval_smollm2.py --model "$SQ2TRT_SMOLLM2" --data "$SQ2TRT_DATA" "$@"
