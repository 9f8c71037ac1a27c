"""End-to-end tests of kiln's QMP socket with a real guest on a real KVM (inside kvm-sandbox):
stop/cont really stop the guest and its clock, system_reset reboots it, system_powerdown powers it
off, quit ends kiln at once; each with QEMU's events. query-blockstats counts a guest's disk I/O."""
import json
import subprocess
import os
import socket
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "../../tests/support"))
import kiln_guest as kg  # noqa: E402

BOOT_TIMEOUT = 240
# Prints a counter and the guest's monotonic clock five times a second, forever.
TICKER = ("i=0; while true; do i=$((i+1)); echo tick=$i up=$(cut -d' ' -f1 /proc/uptime); "
          "sleep 0.2; done")


class Qmp:
    def __init__(self, path, timeout=60):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.sock.settimeout(timeout)
        self.buffer = b""
        self.events = []
        self.greeting = self.read()
        self.command("qmp_capabilities")

    def read(self):
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("QMP connection closed")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

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

    def wait_event(self, name, timeout=BOOT_TIMEOUT):
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event["event"] == name:
                    self.events.remove(event)
                    return event
            self.sock.settimeout(max(0.1, deadline - time.monotonic()))
            self.events.append(self.read())


def last_tick(run):
    ticks = [line for line in run.console().splitlines() if line.startswith("tick=")]
    if not ticks:
        return 0, 0.0
    fields = dict(f.split("=") for f in ticks[-1].split())
    return int(fields["tick"]), float(fields["up"])


class QmpControl(unittest.TestCase):
    def setUp(self):
        # /tmp, not the e2e folder: a 9p mount cannot hold unix sockets.
        self.path = os.path.join(tempfile.mkdtemp(), "qmp.sock")
        self.run_ = kg.kiln("--qmp", f"unix:{self.path},server", "--cpus", "2", script=TICKER)
        self.run_.wait_for("tick=3", BOOT_TIMEOUT)
        self.qmp = Qmp(self.path)

    def tearDown(self):
        self.run_.kill()

    def test_stop_freezes_guest_and_its_clock_and_cont_resumes(self):
        self.assertEqual(self.qmp.command("query-status")["return"]["status"], "running")
        self.assertIn("return", self.qmp.command("stop"))
        self.qmp.wait_event("STOP", 10)
        self.assertEqual(self.qmp.command("query-status")["return"],
                         {"status": "paused", "running": False, "singlestep": False})
        time.sleep(0.5)  # output already on its way drains
        tick, up = last_tick(self.run_)
        time.sleep(3)
        self.assertEqual(last_tick(self.run_)[0], tick, "the guest ran while stopped")
        self.assertIn("return", self.qmp.command("cont"))
        self.qmp.wait_event("RESUME", 10)
        self.run_.wait_for(f"tick={tick + 3}", 60)
        # The guest's clock did not count the 3 s it was stopped.
        after_tick, after_up = last_tick(self.run_)
        self.assertLess(after_up - up, 3.0 + (after_tick - tick) * 0.2 * 0.5,
                        f"guest uptime jumped from {up} to {after_up}")

    def test_query_commands_describe_the_vm(self):
        cpus = self.qmp.command("query-cpus-fast")["return"]
        self.assertEqual([c["cpu-index"] for c in cpus], [0, 1])
        self.assertTrue(all(c["thread-id"] > 0 for c in cpus))
        self.assertEqual(self.qmp.command("query-kvm")["return"], {"enabled": True, "present": True})
        memory = self.qmp.command("query-memory-size-summary")["return"]
        self.assertEqual(memory["base-memory"], 512 << 20)
        error = self.qmp.command("query-balloon")["error"]
        self.assertEqual(error["class"], "DeviceNotActive")

    def test_system_reset_resets_the_guest(self):
        self.assertIn("return", self.qmp.command("system_reset"))
        event = self.qmp.wait_event("RESET", 30)
        self.assertEqual(event["data"], {"guest": False, "reason": "host-qmp-system-reset"})
        # The guest boots again and its script runs anew; QMP stays connected across the reset.
        self.run_.wait_for(kg.MARKER, BOOT_TIMEOUT, count=2)
        self.run_.wait_for("tick=1 ", 60, count=2)
        self.assertEqual(self.qmp.command("query-status")["return"]["status"], "running")

    def test_system_powerdown_powers_the_guest_off(self):
        self.assertIn("return", self.qmp.command("system_powerdown"))
        self.qmp.wait_event("POWERDOWN", 10)
        event = self.qmp.wait_event("SHUTDOWN", 60)
        self.assertEqual(event["data"], {"guest": True, "reason": "guest-shutdown"})
        self.assertEqual(self.run_.wait(60), 0, self.run_.stderr)

    def test_quit_ends_kiln_at_once(self):
        started = time.monotonic()
        self.assertIn("return", self.qmp.command("quit"))
        event = self.qmp.wait_event("SHUTDOWN", 10)
        self.assertEqual(event["data"], {"guest": False, "reason": "host-qmp-quit"})
        self.assertEqual(self.run_.wait(30), 0, self.run_.stderr)
        self.assertLess(time.monotonic() - started, 10)
        self.assertFalse(os.path.exists(self.path) and self.run_.proc.poll() is None)


if __name__ == "__main__":
    unittest.main(verbosity=2)


class QmpBlockstats(unittest.TestCase):
    def test_blockstats_count_the_guests_disk_io(self):
        work = os.path.join(kg.E2E_DIR, "qmp-test")
        os.makedirs(work, exist_ok=True)
        disk = os.path.join(work, "stats.img")
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", disk, "16M"], check=True)
        path = os.path.join(tempfile.mkdtemp(), "qmp.sock")
        # 1 MiB read, then 256 KiB written at 1 MiB and flushed (conv=fsync).
        script = ("dd if=/dev/vda of=/dev/null bs=64k count=16 && "
                  "dd if=/dev/zero of=/dev/vda bs=64k count=4 seek=16 conv=fsync && "
                  "echo io-done; sleep 600")
        run = kg.kiln("--qmp", f"unix:{path},server", "--disk", f"path={disk}", script=script)
        try:
            run.wait_for("io-done", BOOT_TIMEOUT)
            qmp = Qmp(path)
            stats = qmp.command("query-blockstats")["return"]
            self.assertEqual([s["device"] for s in stats], ["disk0"])
            self.assertEqual(stats[0]["qdev"], qmp.command("query-block")["return"][0]["qdev"])
            s = stats[0]["stats"]
            self.assertGreaterEqual(s["rd_bytes"], 1 << 20)
            self.assertGreater(s["rd_operations"], 0)
            self.assertGreater(s["rd_total_time_ns"], 0)
            self.assertGreaterEqual(s["wr_bytes"], 256 << 10)
            self.assertGreater(s["wr_operations"], 0)
            self.assertGreaterEqual(s["wr_highest_offset"], (1 << 20) + (256 << 10))
            self.assertLessEqual(s["wr_highest_offset"], 16 << 20)
            self.assertGreater(s["flush_operations"], 0)
            for kind in ("rd", "wr", "flush", "unmap"):
                self.assertEqual(s[f"failed_{kind}_operations"], 0)
                self.assertEqual(s[f"invalid_{kind}_operations"], 0)
        finally:
            run.kill()
