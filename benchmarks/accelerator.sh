#!/usr/bin/env bash
# The issue's item 6: comparisons 1-4 on an accelerator, both sides in bfloat16, with model FLOP
# utilisation against the chip's measured bfloat16 matmul rate. Ours runs on JAX's default
# device, the peer (torch + transformers) on DEVICE. Written for one short session on a GPU
# machine: the four runs together take a few minutes there.
#
#   OUT=results_dir PYTHON=python3 benchmarks/accelerator.sh
#
# PYTHON needs jax (with the accelerator's plugin), flax, optax, orbax-checkpoint, tensorstore,
# tokenizers, safetensors, gin-config, torch and transformers; the repository root goes on
# PYTHONPATH. Overridable: PEER_PYTHON (PYTHON), DEVICE (cuda), DTYPE (bfloat16), N (peak matrix
# size, 8192), REPEATS (3), SHAPES (tiny small smollm2_135m).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PEER_PYTHON=${PEER_PYTHON:-$PYTHON}
OUT=${OUT:-benchmarks/results}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
N=${N:-8192}
REPEATS=${REPEATS:-3}
SHAPES=${SHAPES:-tiny small smollm2_135m}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
common=(--peer-python "$PEER_PYTHON" --peer-device "$DEVICE" --dtype "$DTYPE" --repeats "$REPEATS")
run() { "$PYTHON" benchmarks/run.py "$@"; }

run matmul_peak "${common[@]}" --n "$N" --output "$OUT/${DEVICE}_matmul_peak.json"
# Batches an accelerator can fill (the CPU defaults are 16 / 8 / 2 pairs of 256 tokens).
# shellcheck disable=SC2086
run rm_train "${common[@]}" --n "$N" --shapes $SHAPES \
    --pairs tiny=64 small=64 smollm2_135m=32 --steps tiny=10 small=10 smollm2_135m=5 \
    --output "$OUT/${DEVICE}_rm_train.json"
# shellcheck disable=SC2086
run sampling "${common[@]}" --n "$N" --shapes $SHAPES --batches 1 16 64 \
    --output "$OUT/${DEVICE}_sampling.json"
# shellcheck disable=SC2086
run reinforce "${common[@]}" --n "$N" --shapes $SHAPES --steps tiny=3 small=3 smollm2_135m=2 \
    --output "$OUT/${DEVICE}_reinforce.json"
