#!/usr/bin/env bash
# One-command GPU check: CUDA tests, 20-step bf16 training runs under torchrun, paper-sized inference
# per stage (published vs ours, batch 1 and 8, peak memory) and Poisson fusion on the device, as ONE
# Markdown table with the machine line. Without CUDA it runs the CPU parts in well under a minute and
# says what it skipped. Run from anywhere:  bash benchmarks/gpu_check.sh [--skip training ...]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" benchmarks/gpu_check.py "$@"
