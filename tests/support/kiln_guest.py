"""Helpers for kiln's end-to-end tests: run kiln (or QEMU) with the fixture guest, collect its
console with host timestamps, and wait for lines. Used inside tools/kvm-sandbox."""
import base64
import os
import signal
import subprocess
import threading
import time

BUILD_DIR = os.environ.get("KILN_BUILD_DIR", os.path.join(os.path.dirname(__file__), "../../build"))
E2E_DIR = os.environ.get("KILN_E2E_DIR", "/var/tmp")
KILN = os.path.join(BUILD_DIR, "vmm/kiln")
INITRAMFS = os.path.join(BUILD_DIR, "guest/initramfs.cpio.gz")
MARKER = "kiln-guest: userspace up"


def guest_kernel():
    root = os.path.realpath(os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "kiln/kernel/current"))
    boot = os.path.join(root, "boot")
    images = [f for f in os.listdir(boot) if f.startswith("vmlinuz-")]
    if not images:
        raise RuntimeError(f"no guest kernel in {boot}: run scripts/setup")
    return os.path.join(boot, images[0])


def script_cmdline(script, extra=""):
    encoded = base64.b64encode(script.encode()).decode()
    return f"console=ttyS0 quiet {extra} kiln.script={encoded}".strip()


class Run:
    """A running VMM process whose console lines are collected as (host time, text)."""

    def __init__(self, argv, stdin=subprocess.DEVNULL):
        self.argv = argv
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True)
        self.lines = []
        self.stderr = ""
        self._cond = threading.Condition()
        self._out = threading.Thread(target=self._read_stdout, daemon=True)
        self._err = threading.Thread(target=self._read_stderr, daemon=True)
        self._out.start()
        self._err.start()

    def _read_stdout(self):
        for raw in self.proc.stdout:
            text = raw.decode(errors="replace").rstrip("\r\n")
            with self._cond:
                self.lines.append((time.monotonic(), text))
                self._cond.notify_all()

    def _read_stderr(self):
        self.stderr = self.proc.stderr.read().decode(errors="replace")

    def wait_for(self, text, timeout=120, count=1):
        """Waits until `count` console lines contain `text`; returns the time of the last."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                hits = [t for t, line in self.lines if text in line]
                if len(hits) >= count:
                    return hits[count - 1]
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._out.is_alive()):
                    raise AssertionError(
                        f"'{text}' (x{count}) not seen within {timeout}s; console:\n"
                        + self.console()[-4000:] + "\nstderr:\n" + self.stderr[-2000:])
                self._cond.wait(min(left, 0.5))

    def wait(self, timeout=120):
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.argv[0]} did not exit within {timeout}s; console:\n"
                                 + self.console()[-4000:])
        self._out.join(5)
        self._err.join(5)
        self.proc.stdout.close()
        self.proc.stderr.close()
        return rc

    def signal(self, sig=signal.SIGTERM):
        self.proc.send_signal(sig)

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._out.join(5)
        self._err.join(5)
        self.proc.stdout.close()
        self.proc.stderr.close()

    def console(self):
        with self._cond:
            return "\n".join(line for _, line in self.lines)


def kiln(*args, script=None, cmdline_extra="", memory="512M", kernel=None, initramfs=INITRAMFS):
    argv = [KILN, "--kernel", kernel or guest_kernel(), "--memory", memory, "--serial", "stdio"]
    if initramfs:
        argv += ["--initramfs", initramfs]
    if script is not None:
        argv += ["--cmdline", script_cmdline(script, cmdline_extra)]
    return Run(argv + list(args))
