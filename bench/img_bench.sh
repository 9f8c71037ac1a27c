#!/usr/bin/env bash
# kiln-img vs qemu-img, side by side: convert raw->qcow2 and qcow2->raw of a 1-2 GiB image.
# Not a test: prints wall times and the kiln/qemu ratio (< 1 means kiln is faster).
# Usage: bench/img_bench.sh [size_in_MiB=1024] [build_dir=build]
set -euo pipefail

SIZE_MB=${1:-1024}
BUILD=${2:-$(cd "$(dirname "$0")/.." && pwd)/build}
KILN=$BUILD/img/kiln-img
[[ -x $KILN ]] || { echo "build kiln-img first ($KILN missing)" >&2; exit 1; }
command -v qemu-img >/dev/null || { echo "qemu-img missing" >&2; exit 1; }

WORK=$(mktemp -d /tmp/kiln-img-bench.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# Source: half data (mixed compressible/incompressible), half holes, like a used disk.
SRC=$WORK/src.raw
truncate -s "${SIZE_MB}M" "$SRC"
for ((mb = 0; mb < SIZE_MB; mb += 8)); do
  if ((mb % 16 == 0)); then
    head -c 4M /dev/urandom | dd of="$SRC" bs=1M seek=$mb conv=notrunc status=none
  else
    { yes kiln || true; } | head -c 4M | dd of="$SRC" bs=1M seek=$mb conv=notrunc status=none
  fi
done
sync

seconds() { # runs "$@", prints wall seconds
  local start end
  start=$(date +%s.%N)
  "$@" >/dev/null
  end=$(date +%s.%N)
  echo "$end - $start" | bc -l
}

row() { # name kiln_cmd... -- qemu_cmd...
  local name=$1; shift
  local kcmd=() qcmd=()
  while [[ $1 != -- ]]; do kcmd+=("$1"); shift; done
  shift
  qcmd=("$@")
  local best_k=999999 best_q=999999 t
  for _ in 1 2 3; do
    t=$(seconds "${kcmd[@]}"); best_k=$(echo "if ($t < $best_k) $t else $best_k" | bc -l)
    t=$(seconds "${qcmd[@]}"); best_q=$(echo "if ($t < $best_q) $t else $best_q" | bc -l)
  done
  printf '%-28s %10.3f %10.3f %8.2f\n' "$name" "$best_k" "$best_q" "$(echo "$best_k / $best_q" | bc -l)"
}

printf '%-28s %10s %10s %8s\n' "operation (${SIZE_MB} MiB, best of 3)" "kiln [s]" "qemu [s]" "ratio"
row "convert raw -> qcow2" "$KILN" convert -O qcow2 "$SRC" "$WORK/k.qcow2" -- \
    qemu-img convert -O qcow2 "$SRC" "$WORK/q.qcow2"
row "convert qcow2 -> raw" "$KILN" convert -O raw "$WORK/q.qcow2" "$WORK/k.raw" -- \
    qemu-img convert -O raw "$WORK/q.qcow2" "$WORK/q.raw"
row "convert -c raw -> qcow2" "$KILN" convert -c -O qcow2 "$SRC" "$WORK/kc.qcow2" -- \
    qemu-img convert -c -O qcow2 "$SRC" "$WORK/qc.qcow2"
row "check qcow2" "$KILN" check "$WORK/q.qcow2" -- qemu-img check "$WORK/q.qcow2"
cmp "$WORK/k.raw" "$WORK/q.raw" && echo "outputs identical (qcow2 -> raw)"
qemu-img compare -q "$WORK/k.qcow2" "$SRC" && echo "outputs identical (raw -> qcow2)"
