# Shared helpers for the scripts in this folder. Source it; do not run it.
set -euo pipefail

KILN_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KILN_CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/kiln
KILN_BUILD=${KILN_BUILD:-$KILN_ROOT/build}

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# The unpacked Debian kernel that serves as guest kernel and as the harness's L1 kernel.
kernel_root() { readlink -f "$KILN_CACHE/kernel/current"; }
kernel_image() { ls "$(kernel_root)"/boot/vmlinuz-* | head -1; }

as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }
