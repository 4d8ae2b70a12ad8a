#!/usr/bin/env bash
# Stage MLX's CUDA wheel for the device calls (../shared/device/prepare), then split it again so that each
# call's carry fits beside the working tree: a call may carry 64 MiB in all, tracked files included, and
# the tree's results (docs/results) grow every session (session 25: 18.6 MB of tracked files on disk, so
# prepare's 48 MiB first half no longer fit; session 26 archived sessions 1-21's results, 17.7 -> 9.2 MB on disk, see
# docs/results/README.md). Run from the repository root; then the two calls as README there says.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
MLX_VERSION=${MLX_VERSION:-0.32.4} MLX_LM_VERSION=${MLX_LM_VERSION:-0.32.2} ../shared/device/prepare > /dev/null
# the files' disk usage, not their sizes: session 25's first call failed with 66.1 MB of sizes (50.3 + 15.7)
# and passed with 64.0, which disk usage (18.6 MB for the tree) explains
tree=$(git ls-files -z | du -c -B1 --files0-from=- 2>/dev/null | tail -1 | cut -f1)
limit=$((64 * 1024 * 1024 - tree - 2 * 1024 * 1024))   # 2 MiB to spare
whl=$(mktemp)
cat .device/a/part.* .device/b/part.* > "$whl"
rm -f .device/a/part.* .device/b/part.*
split -b "$limit" -d "$whl" "$whl.part."
parts=("$whl".part.*)
if [ "${#parts[@]}" -ne 2 ]; then
  echo "device_stage: the wheel needs ${#parts[@]} parts beside a ${tree}-byte tree; stage by hand" >&2
  exit 1
fi
mv "${parts[0]}" .device/a/part.00
mv "${parts[1]}" .device/b/part.01
rm -f "$whl"
b=$(du -cb .device/b | tail -1 | cut -f1)
[ $((b + tree)) -lt $((64 * 1024 * 1024)) ] || { echo "device_stage: .device/b is too large beside the tree" >&2; exit 1; }
echo "staged: .device/a $(du -sh .device/a | cut -f1), .device/b $(du -sh .device/b | cut -f1), tracked tree $((tree / 1048576)) MiB"
