#!/usr/bin/env bash
# One device visit's work, in parts that each fit a 10-minute device call.
# Stage MLX first (../shared/device/README.md): call 1 carries .device/a, then
#   call 2: carry [".device/b"], command: bash bench/gpu_session.sh parity
#   call 3: bash bench/gpu_session.sh kernels      (the machine stays warm 30 s between calls)
#   call 4: bash bench/gpu_session.sh e2b
#   call 5: bash bench/gpu_session.sh presets
# Results go to $OUT (they come back with the call). Timings from one call compare only with
# each other: quote ratios from the same run.
set -uo pipefail
source .device/b/setup.sh >/dev/null || exit 1
OUT=${OUT:-out}
mkdir -p "$OUT"
case "${1:-}" in
  parity)   # every kernel vs float64 oracles on CUDA (nvrtc compiles each instantiation: ~5 min)
    timeout 560 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_decode.py 2>&1 | tail -25 | tee "$OUT/parity.txt" ;;
  kernels)  # micro-benchmarks vs the stock op sequences, then the decode-step ablations
    timeout 280 python3 bench/kernels.py --iters 30 2>&1 | tee "$OUT/kernels.txt"
    timeout 250 python3 bench/ablate.py e2b 4 2>&1 | tail -10 | tee "$OUT/ablate-e2b-q4.txt" ;;
  e2b)      # the headline comparison at three prompt lengths, bf16 and 4-bit
    timeout 280 python3 -m bench.compare --preset e2b --runs 3 -n 64 --out "$OUT" 2>&1 | tail -16
    timeout 280 python3 -m bench.compare --preset e2b -q 4 --runs 3 -n 64 --out "$OUT" 2>&1 | tail -16 ;;
  presets)  # the other families at 841 tokens (31B bf16 needs ~62 GB: 4-bit only here)
    for p in "e4b" "e4b -q 4" "26b-a4b -q 4" "31b -q 4"; do
      timeout 140 python3 -m bench.compare --preset $p -L 841 --runs 3 -n 32 --out "$OUT" 2>&1 | tail -9
    done ;;
  *) echo "usage: bash bench/gpu_session.sh parity|kernels|e2b|presets" >&2; exit 2 ;;
esac
