#!/usr/bin/env bash
# kiln-img vs qemu-img, side by side in one run (issue 5): bench 4 KiB reads/writes on qcow2 at
# queue depth 1 and 64, convert raw<->qcow2, convert -c zstd, check of a fully allocated image;
# then the cache=none (O_DIRECT) reads and convert.
# Not a test: prints best-of-N wall times and the kiln/qemu ratio (< 1 means kiln is faster).
# Host-only (page cache and io_uring of the host); run it on /tmp or /work.
#
# Usage: bench/img_bench.sh [size_MiB=2048] [build_dir=build] [bench_requests=50000] [repeat=3]
#
# "Random" 4 KiB requests: qemu-img bench only walks the image with a fixed step, so the bench
# rows use a step of 2053 clusters (a prime, ~128 MiB) that wraps around the image: consecutive
# requests land in different L2 tables and, for writes on a fresh image, every request allocates
# a new cluster (an allocating write, copy-on-write of the rest of the cluster).
set -euo pipefail

SIZE_MB=${1:-2048}
BUILD=${2:-$(cd "$(dirname "$0")/.." && pwd)/build}
REQS=${3:-50000}
REPEAT=${4:-3}
KILN=$BUILD/img/kiln-img
[[ -x $KILN ]] || { echo "build kiln-img first ($KILN missing)" >&2; exit 1; }
command -v qemu-img >/dev/null || { echo "qemu-img missing" >&2; exit 1; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/kiln-img-bench.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
STEP=$((2053 * 65536))

# Sparse source: half data (mixed compressible/incompressible), half holes, like a used disk.
SRC=$WORK/src.raw
truncate -s "${SIZE_MB}M" "$SRC"
for ((mb = 0; mb < SIZE_MB; mb += 8)); do
  if ((mb % 16 == 0)); then
    head -c 4M /dev/urandom | dd of="$SRC" bs=1M seek=$mb conv=notrunc status=none
  else
    { yes kiln || true; } | head -c 4M | dd of="$SRC" bs=1M seek=$mb conv=notrunc status=none
  fi
done
# Dense qcow2 (every cluster allocated): the bench read and check rows.
DENSE_RAW=$WORK/dense.raw
head -c "${SIZE_MB}M" /dev/urandom >"$DENSE_RAW"
qemu-img convert -O qcow2 "$DENSE_RAW" "$WORK/dense.qcow2"
rm -f "$DENSE_RAW"
sync

# Command run (untimed) before each timed run of the current row: PREP before either tool's;
# KPREP/QPREP, where set, instead of it before kiln's/qemu-img's.
PREP=() KPREP=() QPREP=()
seconds() { # [prep...] -- cmd...: runs prep, then cmd; prints cmd's wall seconds
  local prep=() start end
  while [[ $1 != -- ]]; do prep+=("$1"); shift; done
  shift
  # The previous run's dirty pages are written back now, not during this run.
  sync
  if ((${#prep[@]})); then "${prep[@]}" >/dev/null; fi
  start=$(date +%s.%N)
  "$@" >/dev/null
  end=$(date +%s.%N)
  echo "$end - $start" | bc -l
}

declare -a SUMMARY=()
row() { # name target_ratio kiln_cmd... -- qemu_cmd...
  local name=$1 target=$2; shift 2
  local kcmd=() qcmd=()
  while [[ $1 != -- ]]; do kcmd+=("$1"); shift; done
  shift
  qcmd=("$@")
  local kprep=("${PREP[@]}") qprep=("${PREP[@]}")
  if ((${#KPREP[@]})); then kprep=("${KPREP[@]}"); fi
  if ((${#QPREP[@]})); then qprep=("${QPREP[@]}"); fi
  local best_k=999999 best_q=999999 t
  for ((i = 0; i < REPEAT; i++)); do
    t=$(seconds "${kprep[@]}" -- "${kcmd[@]}")
    best_k=$(echo "if ($t < $best_k) $t else $best_k" | bc -l)
    t=$(seconds "${qprep[@]}" -- "${qcmd[@]}")
    best_q=$(echo "if ($t < $best_q) $t else $best_q" | bc -l)
  done
  local ratio verdict
  ratio=$(echo "$best_k / $best_q" | bc -l)
  # Target: kiln at least `target` times as fast, i.e. ratio <= 1/target.
  verdict=$(echo "$ratio <= 1 / $target" | bc -l)
  printf '%-40s %9.3f %9.3f %7.2f %7s %s\n' "$name" "$best_k" "$best_q" "$ratio" \
    "${target}x" "$([[ $verdict == 1 ]] && echo ok || echo MISS)"
  PREP=() KPREP=() QPREP=()
}

printf '%-40s %9s %9s %7s %7s\n' "operation (${SIZE_MB} MiB, best of $REPEAT)" "kiln [s]" \
  "qemu [s]" "ratio" "target"

for depth in 1 64; do
  row "bench read 4K qcow2 QD$depth (${REQS} req)" 1 \
    "$KILN" bench -c "$REQS" -d $depth -s 4k -S $STEP "$WORK/dense.qcow2" -- \
    qemu-img bench -c "$REQS" -d $depth -s 4k -S $STEP "$WORK/dense.qcow2"
done
for depth in 1 64; do
  PREP=(qemu-img create -q -f qcow2 "$WORK/fresh.qcow2" "${SIZE_MB}M")
  row "bench alloc-write 4K qcow2 QD$depth" 1.5 \
    "$KILN" bench -w -c "$REQS" -d $depth -s 4k -S $STEP "$WORK/fresh.qcow2" -- \
    qemu-img bench -w -c "$REQS" -d $depth -s 4k -S $STEP "$WORK/fresh.qcow2"
done
# Convert rows write a new file: each tool's previous output is deleted (untimed) before its run.
# Converting over it would also time the file system freeing it (ext4 truncating the 512 MiB
# output of a 1 GiB run took 0.2 s here, the same for both tools), and deleting its own output
# hands each tool back the memory its previous run used: on a VM with free page reporting,
# memory free for a while costs a host page fault on first touch, which swung these rows 4x.
fresh() { KPREP=(rm -f "$WORK/$1") QPREP=(rm -f "$WORK/$2"); }
fresh k.qcow2 q.qcow2
row "convert raw -> qcow2" 1.5 "$KILN" convert -O qcow2 "$SRC" "$WORK/k.qcow2" -- \
  qemu-img convert -O qcow2 "$SRC" "$WORK/q.qcow2"
fresh k.raw q.raw
row "convert qcow2 -> raw" 1.5 "$KILN" convert -O raw "$WORK/q.qcow2" "$WORK/k.raw" -- \
  qemu-img convert -O raw "$WORK/q.qcow2" "$WORK/q.raw"
fresh kc.qcow2 qc.qcow2
row "convert -c zstd raw -> qcow2" 1.5 \
  "$KILN" convert -c -O qcow2 -o compression_type=zstd "$SRC" "$WORK/kc.qcow2" -- \
  qemu-img convert -c -O qcow2 -o compression_type=zstd "$SRC" "$WORK/qc.qcow2"
row "check dense qcow2" 1 "$KILN" check "$WORK/dense.qcow2" -- qemu-img check "$WORK/dense.qcow2"
# cache=none (O_DIRECT, past the host page cache): not in the issue's list, but what a VM's disk
# with cache=none and `convert -t none -T none` do.
for depth in 1 64; do
  row "bench read 4K qcow2 QD$depth -t none" 1 \
    "$KILN" bench -t none -c "$REQS" -d $depth -s 4k -S $STEP "$WORK/dense.qcow2" -- \
    qemu-img bench -t none -c "$REQS" -d $depth -s 4k -S $STEP "$WORK/dense.qcow2"
done
fresh kd.qcow2 qd.qcow2
row "convert raw -> qcow2 -t none -T none" 1 \
  "$KILN" convert -t none -T none -O qcow2 "$SRC" "$WORK/kd.qcow2" -- \
  qemu-img convert -t none -T none -O qcow2 "$SRC" "$WORK/qd.qcow2"

# Both tools wrote the same bytes, so both did the same work (same clusters compressed, same
# layout), not only images that read alike.
same_file() {
  if cmp -s "$WORK/$1" "$WORK/$2"; then
    echo "same file, byte for byte ($3)"
  else
    echo "FILES DIFFER ($3)"
  fi
}
same_file k.raw q.raw "qcow2 -> raw"
same_file k.qcow2 q.qcow2 "raw -> qcow2"
same_file kc.qcow2 qc.qcow2 "convert -c zstd"
same_file kd.qcow2 qd.qcow2 "convert -t none -T none"
