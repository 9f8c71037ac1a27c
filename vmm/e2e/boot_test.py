"""End-to-end tests of kiln booting the Debian kernel with the fixture initramfs on a real KVM
(inside tools/kvm-sandbox). Each test boots a real guest."""
import os
import re
import signal
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "../../tests/support"))
import kiln_guest as kg  # noqa: E402

BOOT_TIMEOUT = 180


def run_script(script, *args, memory="512M", timeout=BOOT_TIMEOUT):
    run = kg.kiln(*args, script=script, memory=memory)
    rc = run.wait(timeout)
    return run, rc


def guest_value(run, key):
    """Value of a 'key=value' line the guest script printed."""
    for line in run.console().splitlines():
        m = re.search(re.escape(key) + r"=(\S+)", line)
        if m:
            return m.group(1)
    raise AssertionError(f"guest printed no {key}=; console:\n{run.console()[-3000:]}")


class Boot(unittest.TestCase):
    def test_boots_to_marker_and_powers_off_with_status_0(self):
        run, rc = run_script("echo script-ran; uname -r")
        self.assertIn(kg.MARKER, run.console())
        self.assertIn("script-ran", run.console())
        self.assertIn("kiln-guest: exit 0", run.console())
        self.assertEqual(rc, 0, run.stderr)

    def test_four_vcpus_show_in_the_guest(self):
        run, rc = run_script("echo nproc=$(nproc)", "--cpus", "4")
        self.assertEqual(rc, 0, run.stderr)
        self.assertEqual(guest_value(run, "nproc"), "4")

    def test_memory_sizes_show_in_meminfo(self):
        for size, gib in (("3G", 3), ("6G", 6)):  # 6G lies on both sides of the 32-bit hole
            with self.subTest(size=size):
                run, rc = run_script("echo memtotal=$(sed -n 's/MemTotal: *\\([0-9]*\\).*/\\1/p' "
                                     "/proc/meminfo)", memory=size)
                self.assertEqual(rc, 0, run.stderr)
                kib = int(guest_value(run, "memtotal"))
                # The kernel keeps its own image and reserved areas out of MemTotal.
                self.assertGreater(kib, gib * 1024 * 1024 * 0.9)
                self.assertLessEqual(kib, gib * 1024 * 1024)

    def test_guest_reboot_boots_the_guest_again(self):
        # A small disk remembers across the reboot that the first boot happened.
        work = os.path.join(kg.E2E_DIR, "boot-test")
        os.makedirs(work, exist_ok=True)
        disk = os.path.join(work, "reboot-flag.img")
        with open(disk, "wb") as f:
            f.truncate(1 << 20)
        script = ('if [ "$(head -c 5 /dev/vda)" = first ]; then echo second-boot-ok; '
                  'else printf first | dd of=/dev/vda conv=fsync 2>/dev/null; reboot -f; fi')
        run, rc = run_script(script, "--cpus", "2", "--disk", f"path={disk}",
                             timeout=2 * BOOT_TIMEOUT)
        self.assertEqual(rc, 0, run.stderr)
        self.assertEqual(run.console().count(kg.MARKER), 2, run.console()[-3000:])
        self.assertIn("second-boot-ok", run.console())

    def test_kernel_cache_boots_the_unpacked_vmlinux(self):
        cache = os.path.join(kg.E2E_DIR, "boot-test", "kernel-cache")
        subprocess.run(["rm", "-rf", cache], check=True)
        for boot in ("first", "second"):  # the first unpacks into the cache, the second reads it
            with self.subTest(boot=boot):
                run, rc = run_script("echo booted-from-cache", "--kernel-cache", cache)
                self.assertEqual(rc, 0, run.stderr)
                self.assertIn("booted-from-cache", run.console())
                entries = os.listdir(cache)
                self.assertEqual(len(entries), 1, entries)
                self.assertTrue(entries[0].startswith("vmlinux-"))
        with open(os.path.join(cache, entries[0]), "rb") as f:
            self.assertEqual(f.read(4), b"\x7fELF")

    def test_guest_reboot_with_no_reboot_exits(self):
        run, rc = run_script("reboot -f", "--no-reboot")
        self.assertEqual(rc, 0, run.stderr)
        self.assertEqual(run.console().count(kg.MARKER), 1)

    def test_sigterm_presses_the_power_button(self):
        run = kg.kiln(script="echo waiting; sleep 600")
        run.wait_for("waiting", BOOT_TIMEOUT)
        time.sleep(1)  # let acpid settle
        run.signal(signal.SIGTERM)
        rc = run.wait(60)
        self.assertEqual(rc, 0, run.stderr)
        self.assertNotIn("kiln-guest: exit", run.console())  # the script never finished

    def test_guest_clock_uses_kvmclock_and_runs_at_host_speed(self):
        run = kg.kiln(script="cat /sys/devices/system/clocksource/clocksource0/current_clocksource;"
                             " echo tick-a; sleep 2; echo tick-b")
        t0 = run.wait_for("tick-a", BOOT_TIMEOUT)
        t1 = run.wait_for("tick-b", 30)
        self.assertEqual(run.wait(60), 0, run.stderr)
        self.assertIn("kvm-clock", run.console())
        self.assertGreater(t1 - t0, 1.8)
        self.assertLess(t1 - t0, 4.5)  # generous: a loaded nested host delays console output

    def test_debug_exit_port_sets_the_exit_status(self):
        run, rc = run_script("printf '\\x2a' | dd of=/dev/port bs=1 seek=$((0x501)) 2>/dev/null")
        self.assertEqual(rc, 42, run.console()[-2000:])


class Errors(unittest.TestCase):
    """Each user mistake: one clear line on stderr, exit status 2, nothing left behind."""

    def expect_error(self, args, needle, kernel=None):
        argv = [kg.KILN, "--kernel", kernel or kg.guest_kernel(), "--serial", "off"] + args
        p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        self.assertEqual(p.returncode, 2, p.stderr)
        self.assertIn(needle, p.stderr)
        self.assertEqual(len(p.stderr.strip().splitlines()), 1, p.stderr)

    def test_unknown_flag(self):
        self.expect_error(["--frobnicate"], "frobnicate")

    def test_missing_kernel_file(self):
        self.expect_error([], "/nonexistent/vmlinuz", kernel="/nonexistent/vmlinuz")

    def test_file_that_is_not_a_kernel(self):
        self.expect_error([], "cannot boot /etc/hostname", kernel="/etc/hostname")

    def test_cmdline_too_long_for_the_kernel(self):
        self.expect_error(["--cmdline", "x" * 5000], "command line")

    def test_more_memory_than_the_host_has(self):
        self.expect_error(["--memory", "64T"], "more than this host has")

    def test_more_vcpus_than_allowed(self):
        self.expect_error(["--cpus", "255"], "--cpus 255")

    def test_no_kvm_device(self):
        self.expect_error(["--kvm-device", "/nonexistent/kvm"], "does not exist")

    def test_kvm_device_that_is_not_kvm(self):
        self.expect_error(["--kvm-device", "/dev/null"], "/dev/null")


if __name__ == "__main__":
    unittest.main(verbosity=2)
