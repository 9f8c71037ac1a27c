"""End-to-end tests of kiln's virtio-console (hvc0), virtio-balloon and virtio-vsock with a real
guest on a real KVM (inside tools/kvm-sandbox)."""
import hashlib
import json
import os
import re
import socket
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "../../tests/support"))
import kiln_guest as kg  # noqa: E402

BOOT_TIMEOUT = 240
# Unix sockets cannot live on the harness's shared (9p) folder: a local temporary one.
WORK = tempfile.mkdtemp(prefix="kiln-devices-")
# The virtio console's tty appears once virtio_console has probed.
WAIT_HVC0 = "for i in $(seq 100); do [ -e /dev/hvc0 ] && break; sleep 0.1; done; "


def work_path(name):
    os.makedirs(WORK, exist_ok=True)
    path = os.path.join(WORK, name)
    if os.path.exists(path):
        os.unlink(path)
    return path


def connect_unix(path, timeout=30, run=None):
    deadline = time.monotonic() + timeout
    while True:
        if run is not None and run.proc.poll() is not None:
            raise AssertionError(f"kiln exited ({run.proc.returncode}): {run.stderr}")
        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.connect(path)
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def read_until(sock, text, timeout=BOOT_TIMEOUT):
    sock.settimeout(timeout)
    data = b""
    while text.encode() not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise AssertionError(f"console closed before '{text}'; got {data!r}")
        data += chunk
    return data.decode(errors="replace")


class Qmp:
    def __init__(self, path, run=None):
        self.sock = connect_unix(path, run=run)
        self.sock.settimeout(60)
        self.buffer = b""
        self.events = []
        self.read()  # greeting
        self.command("qmp_capabilities")

    def read(self):
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("QMP connection closed")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def wait_event(self, name, match, timeout=30):
        """Waits for event `name` whose data satisfies `match` (events already read count)."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event["event"] == name and match(event["data"]):
                    self.sock.settimeout(60)
                    return event
            if time.monotonic() > deadline:
                raise AssertionError(f"no matching {name} event; saw {self.events}")
            self.sock.settimeout(max(0.1, deadline - time.monotonic()))
            self.events.append(self.read())

    def command(self, name, **args):
        message = {"execute": name, "id": name}
        if args:
            message["arguments"] = args
        self.sock.sendall(json.dumps(message).encode() + b"\n")
        while True:
            reply = self.read()
            if "event" in reply:
                self.events.append(reply)
            elif reply.get("id") == name:
                return reply


def vm_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M).group(1))


def vsock_echo(cid, port, payload, timeout=60):
    """Sends payload to the guest's echo server and returns what came back."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        try:
            sock.connect((cid, port))
            break
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    sock.settimeout(timeout)

    def send():
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    sender.start()
    received = bytearray()
    while True:
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        received += chunk
    sender.join()
    sock.close()
    return bytes(received)


class Devices(unittest.TestCase):
    """One guest with all three devices, so that the suite boots only twice."""

    def test_console_socket_vsock_echo_and_balloon(self):
        console_path = work_path("hvc0.sock")
        qmp_path = work_path("devices.qmp")
        cid = 3 + os.getpid() % 100000
        # hvc0 both ways; then a vsock echo server; then touch most of the RAM (so that kiln's RSS
        # is high), free it and report MemTotal as the host inflates and deflates the balloon.
        script = (
            # (the reader opens hvc0 before the host is told to type: input that arrives
            # between two opens of the tty was seen to get lost inside the guest)
            WAIT_HVC0 + "(read line < /dev/hvc0; echo got=$line; echo reply=$line > /dev/hvc0) & "
            "sleep 1; echo guest-ready > /dev/hvc0; wait; "
            "vsock-echo 1234; "
            "mkdir /fill && mount -t tmpfs -o size=320m fill /fill && "
            "dd if=/dev/zero of=/fill/f bs=1M count=300 2>/dev/null; rm /fill/f; umount /fill; "
            "mt() { sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo; }; "
            "echo before=$(mt); "
            "settle() { p=0; while [ $(mt) != $p ]; do p=$(mt); sleep 1; done; }; "
            "for i in $(seq 900); do [ $(mt) -lt 250000 ] && break; sleep 0.1; done; "
            "settle; echo inflated=$(mt); "
            "for i in $(seq 900); do [ $(mt) -gt 400000 ] && break; sleep 0.1; done; "
            "settle; echo restored=$(mt)")
        # KILN_LOG=debug: kiln reports the vsock device's counters when it exits.
        os.environ["KILN_LOG"] = "debug"
        try:
            run = kg.kiln("--console", f"socket:{console_path}", "--vsock", f"cid={cid}",
                          "--balloon", "--qmp", f"unix:{qmp_path},server", script=script)
        finally:
            del os.environ["KILN_LOG"]
        started = time.monotonic()
        qmp = None
        try:
            qmp = Qmp(qmp_path, run)
            self.assertEqual(qmp.command("query-balloon")["return"], {"actual": 512 << 20})
            # virtio-console over a socket, both ways.
            sock = connect_unix(console_path, run=run)
            read_until(sock, "guest-ready")
            booted = time.monotonic()
            sock.sendall(b"ping-from-host\n")
            read_until(sock, "reply=ping-from-host")
            run.wait_for("got=ping-from-host", 30)

            # A second VM cannot take the same CID: a usage error, exit status 2.
            run.wait_for("vsock-echo: listening", 60)
            dup = kg.kiln("--vsock", f"cid={cid}", script="echo never")
            self.assertEqual(dup.wait(60), 2, dup.stderr)
            self.assertIn(f"cid={cid}: the CID is already in use", dup.stderr)

            # 1 MiB through vhost-vsock and back.
            payload = os.urandom(1 << 20)
            t0 = time.monotonic()
            echoed = vsock_echo(cid, 1234, payload)
            echo_seconds = time.monotonic() - t0
            self.assertEqual(len(echoed), len(payload))
            self.assertEqual(hashlib.sha256(echoed).hexdigest(),
                             hashlib.sha256(payload).hexdigest())
            run.wait_for(f"vsock-echo: echoed {1 << 20} bytes", 30)

            # The balloon: 512M -> 192M -> 512M.
            run.wait_for("before=", 120)
            rss_before = vm_rss_kib(run.proc.pid)
            self.assertIn("return", qmp.command("balloon", value=192 << 20))
            run.wait_for("inflated=", 120)
            actual = None
            for _ in range(300):
                actual = qmp.command("query-balloon")["return"]["actual"]
                if actual <= 192 << 20:
                    break
                time.sleep(0.1)
            self.assertEqual(actual, 192 << 20)
            # As QEMU, each size the driver reports is a BALLOON_CHANGE event.
            qmp.wait_event("BALLOON_CHANGE", lambda data: data["actual"] == 192 << 20)
            rss_inflated = vm_rss_kib(run.proc.pid)
            # The guest's own statistics, polled every second as a QEMU user would ask for them.
            balloon = "/machine/peripheral/balloon0"
            self.assertEqual(qmp.command("qom-set", path=balloon,
                                         property="guest-stats-polling-interval",
                                         value=1)["return"], {})
            polling_since = time.time()
            guest_stats = None
            for _ in range(600):
                guest_stats = qmp.command("qom-get", path=balloon,
                                          property="guest-stats")["return"]
                if (guest_stats["last-update"] >= int(polling_since) and
                        guest_stats["stats"]["stat-total-memory"] <= 250000 * 1024):
                    break
                time.sleep(0.1)
            self.assertIn("return", qmp.command("balloon", value=512 << 20))
            run.wait_for("restored=", 120)
            # The console client stays connected while the guest powers off: kiln must exit.
            rc = run.wait(60)
        finally:
            if qmp:
                qmp.sock.close()
            if run.proc.poll() is None:
                run.kill()
        self.assertEqual(rc, 0, run.stderr)
        sock.close()
        # vhost-vsock took the guest's kicks from KVM's ioeventfds and raised the vectors'
        # irqfds itself, on both rings: kiln relayed nothing.
        counters = re.search(r"virtio-vsock cid \d+: (\d+) back-end starts \((\d+) rings with "
                             r"direct kicks, (\d+) with direct interrupts\), (\d+) relayed kicks, "
                             r"(\d+) relayed interrupts", run.stderr)
        self.assertIsNotNone(counters, run.stderr[-2000:])
        self.assertEqual(tuple(map(int, counters.groups())), (1, 2, 2, 0, 0), counters.group(0))
        console = run.console()
        before = int(re.search(r"before=(\d+)", console).group(1))
        inflated = int(re.search(r"inflated=(\d+)", console).group(1))
        restored = int(re.search(r"restored=(\d+)", console).group(1))
        print(f"boot to hvc0 {booted - started:.1f}s; vsock echo of 1 MiB {echo_seconds:.2f}s; "
              f"guest MemTotal {before} -> {inflated} -> {restored} KiB; "
              f"kiln VmRSS {rss_before} -> {rss_inflated} KiB", file=sys.stderr)
        # Statistics taken while inflated: the guest's MemTotal, in bytes, from a fresh report.
        stats = guest_stats["stats"]
        self.assertEqual(stats["stat-total-memory"], inflated * 1024, guest_stats)
        self.assertLess(stats["stat-free-memory"], stats["stat-total-memory"])
        self.assertLessEqual(stats["stat-available-memory"], stats["stat-total-memory"])
        self.assertGreater(stats["stat-minor-faults"], 0)
        self.assertLessEqual(guest_stats["last-update"], time.time())
        # 320 MiB went into the balloon: MemTotal and the host's resident memory both drop.
        self.assertLess(inflated, before - 300 * 1024)
        self.assertEqual(restored, before)
        self.assertLess(rss_inflated, rss_before - 200 * 1024)

    def test_hvc0_to_a_file_and_no_balloon_in_qmp(self):
        log = work_path("hvc0.log")
        qmp_path = work_path("noballoon.qmp")
        run = kg.kiln("--console", f"file:{log}", "--qmp", f"unix:{qmp_path},server",
                      script=WAIT_HVC0 + "echo hello-from-hvc0 > /dev/hvc0; echo sent")
        qmp = None
        try:
            qmp = Qmp(qmp_path, run)
            for reply in (qmp.command("balloon", value=1 << 30), qmp.command("query-balloon")):
                self.assertEqual(reply["error"], {"class": "DeviceNotActive",
                                                  "desc": "No balloon device has been activated"})
            rc = run.wait(BOOT_TIMEOUT)
        finally:
            if qmp:
                qmp.sock.close()
            if run.proc.poll() is None:
                run.kill()
        self.assertEqual(rc, 0, run.stderr)
        self.assertIn("sent", run.console())
        with open(log) as f:
            self.assertIn("hello-from-hvc0", f.read())


if __name__ == "__main__":
    unittest.main(verbosity=2)
