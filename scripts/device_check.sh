#!/usr/bin/env bash
# One-shot device check (issue 14): one table for one accelerator, in under 8 minutes.
#
#   scripts/device_check.sh            # Llama-3.2-1B shape, bf16, batch 4 x 2048 on the accelerator
#   scripts/device_check.sh --tiny     # the CPU fallback: tiny preset, in one process (the tests)
#   scripts/device_check.sh --batch 2 --rows plain,attention   # any option of python -m jaxcl.devcheck
#
# Rows: jaxcl's train step (tokens/s, MFU, peak device memory), the same with EWC and with A-GEM
# (overhead ratios), transformers + torch on the same shape and batch (ratio; skipped with a note
# where torch has no CUDA), and the fused attention kernel's agreement with XLA's. With no
# accelerator it falls back to --tiny by itself. See docs/performance.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" -m jaxcl.devcheck "$@"
