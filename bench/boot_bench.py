#!/usr/bin/env python3
"""Boot benchmark: the same kernel + initramfs booted N times under kiln and under QEMU
(`-accel kvm -M microvm`), alternating, in one run (inside tools/kvm-sandbox on hosts without KVM).
Prints medians side by side and their ratio:
  wall      launch -> the guest's marker line, host time
  guest     the guest's own uptime when it printed the marker
  overhead  wall - guest: what the VMM costs before and around the guest's boot
  rss-ovh   the VMM's resident memory minus the guest RAM it has resident (at the marker)
kiln runs twice: booting the bzImage as given, and with --kernel-cache (the vmlinux unpacked once
on the host and booted directly, which skips the guest's decompressor).

The kernel, initramfs and kernel cache are first staged in RAM (/tmp, a tmpfs in the harness), so
every VMM reads them as it would from a warm page cache on a real host. Without it each boot
pays for the harness's 9p share, an artifact of the emulated machine; --from-share keeps that.

  tools/kvm-sandbox -w build/bench -m 4096 -t 1800 -- bench/boot_bench.py -n 5
"""
import argparse
import os
import re
import shutil
import tempfile
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "../tests/support"))
import kiln_guest as kg  # noqa: E402

SCRIPT = "echo uptime=$(cut -d' ' -f1 /proc/uptime)"


def smaps_rss_kib(pid):
    """Total resident KiB and the resident KiB of the largest anonymous mapping (guest RAM)."""
    total, largest = 0, 0
    size = rss = 0
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                largest = max(largest, rss) if size >= 64 << 10 else largest
                size = rss = 0
            elif line.startswith("Size:"):
                size = int(line.split()[1])
            elif line.startswith("Rss:"):
                rss = int(line.split()[1])
                total += rss
    largest = max(largest, rss) if size >= 64 << 10 else largest
    return total, largest


def measure(argv):
    run = kg.Run(argv)
    marker_time = run.wait_for(kg.MARKER, 300)
    total, guest = smaps_rss_kib(run.proc.pid)
    run.wait_for("uptime=", 60)
    uptime = float(re.search(r"uptime=([0-9.]+)", run.console()).group(1))
    run.wait(120)
    wall = marker_time - run.started
    return {"wall": wall, "guest": uptime, "overhead": wall - uptime,
            "rss-ovh": (total - guest) / 1024.0}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=5, help="boots per VMM")
    parser.add_argument("--memory", default="512M")
    parser.add_argument("--from-share", action="store_true",
                        help="read kernel, initramfs and cache where they are, not from RAM")
    args = parser.parse_args()
    kernel, initramfs = kg.guest_kernel(), kg.INITRAMFS
    stage = kg.E2E_DIR if args.from_share else tempfile.mkdtemp(prefix="boot-bench-", dir="/tmp")
    if not args.from_share:
        kernel = shutil.copy(kernel, stage)
        initramfs = shutil.copy(initramfs, stage)
    cmdline = kg.script_cmdline(SCRIPT)
    kiln = [kg.KILN, "--kernel", kernel, "--initramfs", initramfs, "--memory", args.memory,
            "--serial", "stdio", "--cmdline", cmdline]
    qemu = ["qemu-system-x86_64", "-accel", "kvm", "-M", "microvm,acpi=on", "-cpu", "host",
            "-m", args.memory, "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
            "-no-reboot", "-kernel", kernel, "-initrd", initramfs, "-append", cmdline]
    # kiln-cache: --kernel-cache, the bzImage's vmlinux unpacked once and booted directly.
    cache = os.path.join(stage, "kernel-cache")
    kiln_cache = kiln + ["--kernel-cache", cache]
    measure(kiln_cache)  # this first boot unpacks the kernel into the cache; not counted
    vmms = (("kiln", kiln), ("kiln-cache", kiln_cache), ("qemu", qemu))
    results = {name: [] for name, _ in vmms}
    for i in range(args.n):
        for name, argv in vmms:
            results[name].append(measure(argv))
            print(f"run {i + 1} {name}: " + " ".join(
                f"{k}={v:.2f}" for k, v in results[name][-1].items()), flush=True)
    print(f"\nmedians of {args.n} boots (seconds; rss-ovh in MiB)")
    print(f"{'':10} {'kiln':>9} {'kiln-cache':>11} {'qemu':>9} {'kiln/qemu':>10} {'cache/qemu':>11}")
    for key in ("wall", "guest", "overhead", "rss-ovh"):
        k, c, q = (statistics.median(r[key] for r in results[name])
                   for name in ("kiln", "kiln-cache", "qemu"))
        ratio = (lambda x: x / q if q else float("nan"))
        print(f"{key:10} {k:9.2f} {c:11.2f} {q:9.2f} {ratio(k):10.2f} {ratio(c):11.2f}")


if __name__ == "__main__":
    main()
