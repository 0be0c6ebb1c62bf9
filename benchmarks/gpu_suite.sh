#!/usr/bin/env bash
# The GPU suite of issue 14, one prepared script (<= 6 min on an H200).
#
#   bash benchmarks/gpu_suite.sh [--device cuda|cpu] [--quick] [OUT_DIR]      (OUT_DIR default: benchmarks/results)
#
# Needs only torch, numpy, this repository's diffusion_core and (optionally) diffusers; no Ray, no registry.
# diffusers comes as a wheel: if it is not importable and WHEELS_DIR (default: ./wheels) holds diffusers-*.whl,
# it is installed from there without an index. Writes OUT_DIR/gpu_suite_<device>.json, and
# OUT_DIR/engine_bench*.json through benchmarks/engine_bench.py when that file exists.
# The CPU smoke run (`--device cpu --quick`) is part of the test suite (tests/test_benchmarks_smoke.py).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
PY="${PYTHON:-python3}"
DEVICE=""
QUICK=()
OUT="$ROOT/benchmarks/results"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --device=*) DEVICE="${1#*=}"; shift ;;
    --quick) QUICK=(--quick); shift ;;
    -h|--help) sed -n '2,11p' "${BASH_SOURCE[0]}"; exit 0 ;;
    -*) echo "gpu_suite.sh: unknown option $1 (accepted: --device cuda|cpu, --quick, OUT_DIR)" >&2; exit 2 ;;
    *) OUT="$1"; shift ;;
  esac
done
if [[ -z "$DEVICE" ]]; then
  DEVICE="$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')"
fi
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

WHEELS_DIR="${WHEELS_DIR:-$ROOT/wheels}"
if ! "$PY" -c 'import diffusers' 2>/dev/null; then
  if compgen -G "$WHEELS_DIR/diffusers-*.whl" >/dev/null; then
    echo "[gpu_suite] installing diffusers from $WHEELS_DIR (no index)"
    "$PY" -m pip install -q --no-index --find-links "$WHEELS_DIR" diffusers \
      || echo "[gpu_suite] diffusers install failed; its comparison row is skipped"
  else
    echo "[gpu_suite] diffusers not importable and no wheel in $WHEELS_DIR; its comparison row is skipped"
  fi
fi

echo "[gpu_suite] device=$DEVICE quick=${QUICK[*]:-no} out=$OUT"
"$PY" "$HERE/gpu_suite.py" --device "$DEVICE" "${QUICK[@]}" --out-dir "$OUT"

if [[ -f "$HERE/engine_bench.py" ]]; then
  if [[ ${#QUICK[@]} -gt 0 ]] && ! grep -q -- "--quick" "$HERE/engine_bench.py"; then
    echo "[gpu_suite] engine_bench.py has no --quick mode: serving-engine rows skipped in a quick run"
  else
    echo "[gpu_suite] serving engine: benchmarks/engine_bench.py"
    "$PY" "$HERE/engine_bench.py" --device "$DEVICE" --out "$OUT" "${QUICK[@]}"
  fi
else
  echo "[gpu_suite] benchmarks/engine_bench.py not found: serving-engine rows skipped"
fi
echo "[gpu_suite] done"
