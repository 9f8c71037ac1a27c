#!/usr/bin/env python3
"""virtio benchmark: the same guest (the project's Debian kernel + the fixture initramfs carrying fio
and iperf3) on the same backing file and the same tap, under kiln and under QEMU (`-accel kvm`,
virtio-blk-pci and virtio-net-pci, same vCPUs and memory), in one run (inside tools/kvm-sandbox on
hosts without KVM). Each boot runs, inside the guest:
  fio on /dev/vda (direct=1, libaio, iodepth 32, time-based, page cache dropped before each job):
      1 MiB sequential write, 1 MiB sequential read, 4 KiB random read
  iperf3 -c against `iperf3 -s` on the tap's host address: guest->host, then -R (host->guest)
and prints the medians side by side with their ratio.

  tools/kvm-sandbox -w build/bench -m 3072 -t 1200 -- python3 bench/virtio_bench.py

--rows picks the rows to run (e.g. --rows net for the two iperf3 ones: a few minutes with -n 2).

The backing file lives in the harness's /tmp (tmpfs: no O_DIRECT there, so both VMMs use the host
page cache, cache=writeback); --disk-dir puts it elsewhere, and --disk-format qcow2 makes it a qcow2
image (preallocation=falloc) that both VMMs open as qcow2. kiln's and QEMU's net options are
--kiln-net / --qemu-netdev templates ({tap} and {mac} are filled in). By default each VMM runs
as its users get it: kiln with vhost-net where the host has it (its default), QEMU with vhost=off
(QEMU's). Like with like: --kiln-net 'tap={tap},mac={mac},vhost=off', or --qemu-netdev with
vhost=on; --kiln-alt-net adds a second kiln configuration to the same rounds.

-v adds, per phase: its wall time, the VMM's CPU time per thread name, the host KVM's exit and
injection counters (debugfs) and the guest's interrupts per virtio vector; and the features the
guest negotiated. --perf PHASE profiles one phase with perf (it perturbs that phase). Under the
emulated harness on a shared host the figures swing severalfold between runs with the host's load:
use -n 3 or more (rounds alternate the VMM order) and read the min-max columns before the ratio.
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "../tests/support"))
import kiln_guest as kg  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_INITRAMFS = os.path.join(HERE, "../tests/guest/build-initramfs")
TOOLS_INITRAMFS = os.path.join(kg.BUILD_DIR, "guest/initramfs-bench.cpio")
TAP = "kilnbench0"
MAC = "52:54:00:4b:42:01"
HOST_IP = "10.0.3.1"
GUEST_IP = "10.0.3.15"
IPERF_PORT = 5201
DONE = "virtio-bench: done"

# name, fio rw, block size, what the table shows
FIO_JOBS = (("seqwrite", "write", "1M", "bw"),
            ("seqread", "read", "1M", "bw"),
            ("randread", "randread", "4k", "iops"))
ROWS = (("seqread", "seq read 1 MiB (MiB/s)"),
        ("seqwrite", "seq write 1 MiB (MiB/s)"),
        ("randread", "rand read 4 KiB (IOPS)"),
        ("tcp-tx", "TCP guest->host (Mbit/s)"),
        ("tcp-rx", "TCP host->guest (Mbit/s)"))


def guest_script(args):
    """The shell script the guest's init runs: network up, the fio jobs, the iperf3 runs. Kept
    short: it travels base64-encoded on the kernel command line (2 KiB at most on x86)."""
    fio = (f"fio --filename=/dev/vda --direct=1 --ioengine={args.ioengine} --iodepth={args.iodepth}"
           f" --time_based --runtime={args.fio_runtime} --ramp_time=1 --size={args.disk_mib}M"
           " --output-format=terse --terse-version=3")
    iperf = f"iperf3 -c {HOST_IP} -p {IPERF_PORT} -t {args.iperf_time} -f m --connect-timeout 10000"
    lines = [f"ip link set eth0 up && ip addr add {GUEST_IP}/24 dev eth0 || echo bench-error=net",
             # run NAME KIND CMD...: its exit status and its output, each line tagged.
             'r() { n=$1 k=$2; shift 2; "$@" > /tmp/o 2>&1; echo $k-rc $n $?; '
             'sed "s/^/$k-out $n /" /tmp/o; grep virtio /proc/interrupts | sed "s/^/irq-out $n /"; }',
             f'F="{fio}"', f'I="{iperf}"',
             'grep virtio /proc/interrupts | sed "s/^/irq-out go /"',
             # What the guest negotiated, to compare the VMMs' devices (-v prints it).
             "for d in /sys/bus/virtio/devices/*; do echo feat $(cat $d/device) $(cat $d/features); done",
             "cd /sys/block/vda/queue && echo blkq $(cat max_sectors_kb max_segments nr_requests); cd /",
             "echo bench-go"]
    for name, rw, bs, _ in FIO_JOBS:
        if name not in args.rows:
            continue
        lines.append("sync; echo 3 > /proc/sys/vm/drop_caches")
        lines.append(f"r {name} fio $F --name={name} --rw={rw} --bs={bs}")
    for name, flag in (("tcp-tx", ""), ("tcp-rx", " -R")):
        if name in args.rows:
            lines.append(f"r {name} iperf $I{flag}")
    lines.append(f"echo '{DONE}'")
    return "\n".join(lines) + "\n"


def parse_results(console, rows):
    """{row: value} from the guest's console: fio terse v3 lines and iperf3's receiver lines."""
    results = {}
    for name, _, _, kind in FIO_JOBS:
        if name not in rows:
            continue
        match = re.search(rf"^fio-out {name} (3;fio-.*)$", console, re.M)
        if not match:
            raise RuntimeError(f"no fio result for {name}; console:\n{console[-3000:]}")
        fields = match.group(1).split(";")
        # terse v3: read bw KiB/s and IOPS are fields 6 and 7, write's 47 and 48.
        bw_kib, iops = (fields[47], fields[48]) if name == "seqwrite" else (fields[6], fields[7])
        results[name] = float(bw_kib) / 1024 if kind == "bw" else float(iops)
    for name in (r for r in ("tcp-tx", "tcp-rx") if r in rows):
        match = re.search(rf"^iperf-out {name} .* ([0-9.]+) Mbits/sec.*receiver$", console, re.M)
        if not match:
            raise RuntimeError(f"no iperf3 result for {name}; console:\n{console[-3000:]}")
        results[name] = float(match.group(1))
    return results


def vmm_cpu_seconds(pid):
    """User + system CPU time the VMM process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


KVM_DEBUGFS = "/sys/kernel/debug/kvm"
KVM_STATS = ("exits", "io_exits", "mmio_exits", "irq_injections", "halt_exits", "irq_exits")


def kvm_stats():
    """This host's KVM counters, summed over its VMs (one runs at a time); {} without debugfs."""
    stats = {}
    for key in KVM_STATS:
        try:
            with open(os.path.join(KVM_DEBUGFS, key)) as f:
                stats[key] = int(f.read())
        except OSError:
            pass
    return stats


def guest_interrupts(console, phase):
    """Interrupts the guest took per virtio vector during `phase` ({vector name: count})."""
    counts = {}
    for line in console.splitlines():
        if not line.startswith(f"irq-out {phase} "):
            continue
        fields = line.split()[3:]  # "irq-out PHASE N: count... chip... name"
        numbers = [int(f) for f in fields[:-1] if f.isdigit()]
        counts[fields[-1]] = sum(numbers)
    return counts


# Console lines that end each phase of the guest script (after "bench-go").
PHASES = [name for name, _, _, _ in FIO_JOBS] + ["tcp-tx", "tcp-rx"]


def phase_marker(phase):
    return f"{'iperf' if phase.startswith('tcp') else 'fio'}-rc {phase} "


def thread_cpu_ms(pid):
    """CPU time per thread name of the VMM (io_uring's iou-wrk-N workers and the like summed)."""
    per_name = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                text = f.read()
        except OSError:
            continue  # the thread has ended
        comm = re.sub(r"-?[0-9]+$", "", text[text.index("(") + 1:text.rindex(")")]) or "?"
        fields = text.rsplit(")", 1)[1].split()
        ms = (int(fields[11]) + int(fields[12])) * 1000 // os.sysconf("SC_CLK_TCK")
        per_name[comm] = per_name.get(comm, 0) + ms
    return per_name


def snapshot(run):
    return {"t": time.monotonic(), "cpu": vmm_cpu_seconds(run.proc.pid), **kvm_stats(),
            "threads": thread_cpu_ms(run.proc.pid)}


def print_phase_costs(name, phases, snaps, console, results):
    """What each phase cost: the VMM's CPU time, the host KVM's exits and injected interrupts and
    the guest's virtio interrupts, per operation (an I/O for fio, a MiB for iperf3)."""
    print(f"{name} per-phase costs (t: phase wall time in ms, VMM cpu in ms, KVM counters and guest virtio irqs):")
    before = guest_interrupts(console, "go")
    for phase, (start, end) in zip(phases, zip(snaps, snaps[1:])):
        irqs = guest_interrupts(console, phase)
        delta = {k: end[k] - start.get(k, 0) for k in end if k != "threads"}
        threads = {k: v - start["threads"].get(k, 0) for k, v in end["threads"].items()}
        guest = {k: v - before.get(k, 0) for k, v in irqs.items() if v - before.get(k, 0)}
        before = irqs
        print(f"  {phase:9} " + " ".join(
            f"{k}={v * 1000:.0f}" if k in ("cpu", "t") else f"{k}={v}" for k, v in delta.items())
            + " guest-irqs: " + " ".join(f"{k}={v}" for k, v in guest.items())
            + "\n            threads(ms): " + " ".join(f"'{k}'={v}" for k, v in threads.items() if v))


def start_perf(name, phase, seconds):
    """A system-wide CPU profile (cpu-clock: the emulated machine has no PMU) of the phase."""
    data = f"/tmp/virtio-bench/perf-{name}-{phase}.data"
    return data, subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-a", "-g", "-o", data,
                                   "--", "sleep", str(seconds)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def report_perf(name, data):
    out = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children",
                          "--sort", "comm,dso", "-g", "none", "--percent-limit", "1"],
                         capture_output=True, text=True).stdout
    print(f"{name} profile:")
    print("\n".join(line for line in out.splitlines() if line.strip() and not line.startswith("#")))


def measure(name, argv, timeout, verbose, rows, perf_phase=None, perf_seconds=8):
    if verbose:
        print(f"{name}: " + " ".join(a if len(a) < 200 else a[:80] + "..." for a in argv), flush=True)
    started = time.monotonic()
    run = kg.Run(argv)
    try:
        run.wait_for("bench-go", timeout)
        snaps = [snapshot(run)]
        perf = None
        phases = [phase for phase in PHASES if phase in rows]
        for phase in phases:
            if phase == perf_phase:
                time.sleep(3)  # past the cache drop and fio's start
                perf = start_perf(name, phase, perf_seconds)
            run.wait_for(phase_marker(phase), timeout)
            snaps.append(snapshot(run))
        run.wait_for(DONE, timeout)
        cpu = vmm_cpu_seconds(run.proc.pid)
        rc = run.wait(120)
    finally:
        if run.proc.poll() is None:
            run.kill()
    console = run.console()
    if rc != 0:
        raise RuntimeError(f"{name} exited {rc}; stderr:\n{run.stderr[-3000:]}")
    for line in console.splitlines():
        if re.match(r"^(fio|iperf)-rc \S+ [1-9]", line) or "bench-error" in line:
            raise RuntimeError(f"{name}: guest step failed: {line}; console:\n{console[-4000:]}")
    results = parse_results(console, rows)
    if verbose:
        print("\n".join(line for line in console.splitlines()
                        if re.match(r"^(iperf-out .*(sender|receiver)|feat |blkq )", line)))
        for line in run.stderr.splitlines():
            if "virtio" in line:
                print(f"{name} stderr: {line}")
        print_phase_costs(name, phases, snaps, console, results)
    if perf:
        perf[1].wait()
        report_perf(name, perf[0])
    print(f"{name}: " + " ".join(f"{k}={v:.2f}" for k, v in results.items())
          + f" (wall {time.monotonic() - started:.0f} s, VMM cpu {cpu:.1f} s)", flush=True)
    return results


def ensure_initramfs(args, work):
    """The fixture initramfs with fio and iperf3: the build's one, else built here."""
    if args.initramfs:
        source = args.initramfs
    elif os.path.exists(TOOLS_INITRAMFS):
        source = TOOLS_INITRAMFS
    else:
        source = os.path.join(work, "initramfs-bench.cpio")
        print(f"building {source}", flush=True)
        subprocess.run([BUILD_INITRAMFS, "--tools", "fio iperf3", source], check=True)
    # Read once from tmpfs: the harness's / is 9p, slow for ~90 MB per boot.
    local = os.path.join(work, "initramfs.cpio")
    if os.path.abspath(source) != local:
        shutil.copyfile(source, local)
    return local


def make_disk(args, work):
    path = os.path.join(args.disk_dir or work, f"disk.{args.disk_format}")
    if args.disk_format == "qcow2":
        # Clusters allocated up front (as the raw file's blocks below), in QEMU's layout.
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=falloc",
                        path, f"{args.disk_mib}M"], check=True)
        return path
    with open(path, "wb") as f:
        f.truncate(args.disk_mib << 20)
    # Allocated up front so that reads hit real pages (a hole reads as zeroes, for free).
    subprocess.run(["fallocate", "-l", f"{args.disk_mib}M", path], check=True)
    return path


def setup_tap():
    subprocess.run(["ip", "link", "del", TAP], stderr=subprocess.DEVNULL)
    for cmd in (["tuntap", "add", "dev", TAP, "mode", "tap"],
                ["addr", "add", f"{HOST_IP}/24", "dev", TAP], ["link", "set", TAP, "up"]):
        subprocess.run(["ip", *cmd], check=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=1, help="boots per VMM (medians are shown)")
    parser.add_argument("--memory", default="1024", help="guest RAM in MiB")
    parser.add_argument("--cpus", type=int, default=1)
    parser.add_argument("--disk-mib", type=int, default=256)
    parser.add_argument("--disk-dir", help="where the backing file goes (default: a tmpfs dir)")
    parser.add_argument("--disk-format", choices=("raw", "qcow2"), default="raw",
                        help="the backing file's format (qcow2: preallocation=falloc)")
    parser.add_argument("--cache", default="writeback", help="kiln's and QEMU's cache mode")
    parser.add_argument("--ioengine", default="libaio")
    parser.add_argument("--iodepth", type=int, default=32)
    parser.add_argument("--fio-runtime", type=int, default=10)
    parser.add_argument("--iperf-time", type=int, default=10)
    parser.add_argument("--initramfs", help="a fixture initramfs built with --tools 'fio iperf3'")
    parser.add_argument("--kiln-net", default="tap={tap},mac={mac}", help="kiln --net template")
    parser.add_argument("--kiln-alt-net", help="also boot kiln with this --net template in each "
                        "round, as column kiln-alt (e.g. 'tap={tap},mac={mac},vhost=on' to weigh "
                        "vhost-net against kiln's own data path in one run)")
    parser.add_argument("--kiln-disk", default="path={path},format={format},cache={cache}",
                        help="kiln --disk template")
    parser.add_argument("--qemu-machine", default="q35")
    parser.add_argument("--qemu-netdev", default="tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off")
    parser.add_argument("--qemu-drive",
                        default="file={path},if=none,id=d0,format={format},cache={cache},aio=threads")
    parser.add_argument("--only", choices=("kiln", "qemu"), help="run one VMM only")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="per-phase costs (VMM and thread CPU, KVM exits, guest interrupts)")
    parser.add_argument("--perf", choices=PHASES, help="profile this phase with perf (whole host)")
    parser.add_argument("--rows", default=",".join(PHASES),
                        help="comma-separated rows to run (of " + ",".join(PHASES)
                        + "; 'net' and 'blk' name the iperf3 and the fio ones): a network change"
                        " need not wait for fio")
    args = parser.parse_args()
    groups = {"net": ["tcp-tx", "tcp-rx"], "blk": [name for name, _, _, _ in FIO_JOBS]}
    args.rows = [row for word in args.rows.split(",") if word
                 for row in groups.get(word, [word])]
    unknown = [row for row in args.rows if row not in PHASES]
    if unknown or not args.rows:
        parser.error(f"--rows: unknown {','.join(unknown)}; choose from {','.join(PHASES)}, net, blk")
    if args.perf and args.perf not in args.rows:
        parser.error(f"--perf {args.perf} is not among --rows")

    work = "/tmp/virtio-bench"
    os.makedirs(work, exist_ok=True)
    initramfs = ensure_initramfs(args, work)
    disk = make_disk(args, work)
    setup_tap()
    if args.verbose:
        os.environ["KILN_LOG"] = "debug"  # kiln reports its devices' counters at exit
    if args.verbose and not os.path.isdir(KVM_DEBUGFS):
        # For the per-phase KVM counters; the harness's machine does not mount debugfs itself.
        subprocess.run(["mount", "-t", "debugfs", "debugfs", "/sys/kernel/debug"],
                       stderr=subprocess.DEVNULL, check=False)
    server = subprocess.Popen(["iperf3", "-s", "-B", HOST_IP, "-p", str(IPERF_PORT)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kernel = kg.guest_kernel()
    cmdline = kg.script_cmdline(guest_script(args), "loglevel=3")
    memory = f"{args.memory}M" if args.memory.isdigit() else args.memory
    fill = {"tap": TAP, "mac": MAC, "path": disk, "cache": args.cache, "format": args.disk_format}
    kiln = [kg.KILN, "--kernel", kernel, "--initramfs", initramfs, "--memory", memory,
            "--cpus", str(args.cpus), "--serial", "stdio", "--cmdline", cmdline,
            "--disk", args.kiln_disk.format(**fill), "--net", args.kiln_net.format(**fill)]
    qemu = ["qemu-system-x86_64", "-name", "bench,debug-threads=on", "-accel", "kvm", "-M", args.qemu_machine, "-cpu", "host",
            "-smp", str(args.cpus), "-m", memory, "-nodefaults", "-no-user-config", "-nographic",
            "-serial", "stdio", "-no-reboot", "-kernel", kernel, "-initrd", initramfs,
            "-append", cmdline, "-drive", args.qemu_drive.format(**fill),
            "-device", "virtio-blk-pci,drive=d0",
            "-netdev", args.qemu_netdev.format(**fill), "-device", f"virtio-net-pci,netdev=n0,mac={MAC}"]
    vmms = [(name, argv) for name, argv in (("kiln", kiln), ("qemu", qemu))
            if args.only in (None, name)]
    if args.kiln_alt_net:
        alt = list(kiln)
        alt[alt.index("--net") + 1] = args.kiln_alt_net.format(**fill)
        vmms.insert(1, ("kiln-alt", alt))
    timeout = 240 + 3 * (args.fio_runtime + 30) + 2 * (args.iperf_time + 30)
    results = {name: [] for name, _ in vmms}
    try:
        for round_index in range(args.n):
            # Alternating the order spreads a drift of the host's load over both VMMs.
            for name, argv in (vmms if round_index % 2 == 0 else vmms[::-1]):
                subprocess.run(["ip", "neigh", "flush", "dev", TAP], check=False)
                results[name].append(measure(name, argv, timeout, args.verbose, args.rows, args.perf,
                                             min(8, args.fio_runtime)))
    finally:
        server.terminate()
        server.wait()
        subprocess.run(["ip", "link", "del", TAP], stderr=subprocess.DEVNULL)
        os.unlink(disk)

    print(f"\nmedians of {args.n} boot(s) per VMM; {args.cpus} vCPU, {memory} RAM, "
          f"{args.disk_mib} MiB {args.disk_format} file (cache={args.cache}), fio {args.ioengine} "
          f"iodepth={args.iodepth} {args.fio_runtime} s/job, iperf3 {args.iperf_time} s")
    names = [name for name, _ in vmms]
    with_ratio = "kiln" in names and "qemu" in names
    print(f"{'':28}" + "".join(f"{n:>10}" for n in names) + ("  kiln/QEMU" if with_ratio else "")
          + ("   min-max per VMM" if args.n > 1 else ""))
    for key, label in ROWS:
        if key not in args.rows:
            continue
        values = [statistics.median(r[key] for r in results[n]) for n in names]
        line = f"{label:28}" + "".join(f"{v:10.2f}" for v in values)
        if with_ratio:
            kiln_value, qemu_value = values[names.index("kiln")], values[names.index("qemu")]
            line += f"  {kiln_value / qemu_value:9.2f}" if qemu_value else "        nan"
        if args.n > 1:  # on a loaded host the spread can exceed the difference between VMMs
            line += "   " + " ".join(f"{min(r[key] for r in results[n]):.1f}-"
                                     f"{max(r[key] for r in results[n]):.1f}" for n in names)
        print(line)


if __name__ == "__main__":
    main()
