"""End-to-end test of kiln's virtio-net with a real guest on a real KVM (inside tools/kvm-sandbox):
a tap with an address on the host side, the guest configures eth0 and we check its MAC, ping
both ways, TCP transfers both ways with matching checksums (and their rates), and that a busy
tap or a multicast MAC is a clear usage error. The guest switches its receive offloads off and
on with ethtool (virtio-net's control queue) and a transfer in between still arrives intact. All of it twice: with the data path in kiln
(vhost=off) and in the host kernel's vhost-net (vhost=on); the rates of both are printed side by
side at the end."""
import hashlib
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "../../tests/support"))
import kiln_guest as kg  # noqa: E402

TAP = "kilntap0"
HOST_IP = "10.0.2.1"
GUEST_IP = "10.0.2.15"
TRANSFER_MIB = 6  # guest->host with nc: busybox nc writes 1 KiB at a time, slowly
NO_OFFLOAD_BYTES = 16 << 20  # host->guest with the guest's receive offloads switched off
BULK_BYTES = 100 * 1000 * 1000  # host->guest with nc and guest->host with wget: 100 MB each
SCRIPT_TIMEOUT = 600  # boot plus the guest's whole script (200 MB through a nested guest)


# The guest masks the MSI-X entry of eth0's receive queue behind its driver's back (devmem on the
# table the capability points at), pings the host so that replies arrive while it is masked,
# reads the pending bit, and unmasks. The entry index is the MSI hwirq's low 11 bits. The guest
# fetches this script from the host (port 5005).
MSIX_MASK_SCRIPT = r"""
pci=$(readlink -f /sys/class/net/eth0/device/..)
vdev=$(basename $(readlink -f /sys/class/net/eth0/device))
byte() {{ od -An -tu1 -j$1 -N1 $pci/config | tr -d ' '; }}
dword() {{ od -An -tu4 -j$1 -N4 $pci/config | tr -d ' '; }}
bar() {{ printf '%d' $(sed -n "$(($1 + 1))p" $pci/resource | cut -d' ' -f1); }}
cap=$(byte 52)
while [ "$cap" -ne 0 ] && [ "$(byte $cap)" -ne 17 ]; do cap=$(byte $((cap + 1))); done
table=$(dword $((cap + 4))); pba=$(dword $((cap + 8)))
line=$(grep " $vdev-input.0" /proc/interrupts)
irq=$(echo "$line" | cut -d: -f1 | tr -d ' ')
entry=$(( $(echo "$line" | grep -o '[0-9]*-edge' | cut -d- -f1) & 2047 ))
ctrl=$(( $(bar $((table & 7))) + (table & ~7) + entry * 16 + 12 ))
pbaword=$(( $(bar $((pba & 7))) + (pba & ~7) + entry / 32 * 4 ))
count() {{ grep "^ *$irq:" /proc/interrupts | awk '{{n = 0; for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i; print n}}'; }}
devmem $ctrl 32 1
before=$(count)
ping -c 2 -W 1 {host} > /dev/null 2>&1 && echo masked-ping=answered || echo masked-ping=lost
during=$(count)
pending=$(( ($(devmem $pbaword 32) >> (entry % 32)) & 1 ))
devmem $ctrl 32 0
sleep 1
echo msix-mask entry=$entry before=$before during=$during after=$(count) pending=$pending
ping -c 2 -W 5 {host} > /dev/null 2>&1 && echo ping-after-unmask=ok
"""

# The guest turns its receive offloads off (VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET on the control
# queue), takes a transfer from the host that the tap must now segment for it, and turns them on.
# Then it attaches an XDP program to eth0 in the driver (xdpdrv), pings through it and detaches
# it: Linux's virtio_net turns the offloads off and on again around XDP with the same command,
# and refuses XDP without it. iproute2's ip loads the program; busybox's cannot, and busybox's
# shell runs its own applet for `ip` unless called by path.
OFFLOADS_SCRIPT = r"""
echo gro-hw-before=$(ethtool -k eth0 | grep -c 'rx-gro-hw: on$')
ethtool -K eth0 rx-gro-hw off && echo gro-hw-off=ok
echo gro-hw-after=$(ethtool -k eth0 | grep -c 'rx-gro-hw: off$')
nc {host} 5006 < /dev/null > /tmp/in.bin
echo no-offload-md5=$(md5sum < /tmp/in.bin | cut -d' ' -f1) no-offload-size=$(wc -c < /tmp/in.bin)
rm /tmp/in.bin
ethtool -K eth0 rx-gro-hw on && echo gro-hw-on=ok
nc {host} 5008 < /dev/null > /tmp/xdp.o
/usr/sbin/ip link set dev eth0 xdpdrv obj /tmp/xdp.o sec xdp && echo xdp-attach=ok
echo xdp-progs=$(/usr/sbin/ip link show dev eth0 | grep -c 'prog/xdp')
ping -c 2 -W 5 {host} > /dev/null 2>&1 && echo xdp-ping=ok
/usr/sbin/ip link set dev eth0 xdpdrv off && echo xdp-detach=ok
"""

# XDP_PASS for every frame.
XDP_PASS_C = """
__attribute__((section("xdp"), used)) int xdp_pass(void *ctx) { return 2; }
char _license[] __attribute__((section("license"), used)) = "GPL";
"""


def xdp_pass_object():
    """XDP_PASS compiled for BPF by the host's clang."""
    with tempfile.TemporaryDirectory() as tmp:
        source, obj = os.path.join(tmp, "xdp.c"), os.path.join(tmp, "xdp.o")
        with open(source, "w") as f:
            f.write(XDP_PASS_C)
        subprocess.run(["clang", "-O2", "-target", "bpf", "-c", source, "-o", obj], check=True)
        with open(obj, "rb") as f:
            return f.read()


def fnv1a_mac(name):
    """The MAC kiln derives from a tap name (devices/virtio/virtio_net.cpp default_mac)."""
    h = 2166136261
    for c in name.encode():
        h = ((h ^ c) * 16777619) & 0xFFFFFFFF
    return "52:54:00:%02x:%02x:%02x" % ((h >> 16) & 0xFF, (h >> 8) & 0xFF, h & 0xFF)


def ip(*args):
    subprocess.run(["ip", *args], check=True)


def icmp_checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def ping(address, count=3, timeout=10):
    """ICMP echo from the host (there is no ping binary in the harness); replies received."""
    replies = 0
    ident = os.getpid() & 0xFFFF
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        for seq in range(count):
            payload = b"kiln-ping" * 4
            header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
            packet = struct.pack("!BBHHH", 8, 0, icmp_checksum(header + payload), ident, seq) + payload
            s.sendto(packet, (address, 0))
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                s.settimeout(max(0.1, deadline - time.monotonic()))
                try:
                    data, source = s.recvfrom(4096)
                except socket.timeout:
                    break
                icmp = data[(data[0] & 0xF) * 4:]
                kind, _, _, rid, rseq = struct.unpack("!BBHHH", icmp[:8])
                if source[0] == address and kind == 0 and rid == ident and rseq == seq:
                    replies += 1
                    break
    return replies


class Server(threading.Thread):
    """One TCP connection on HOST_IP:port that either sends `payload` or reads to EOF."""

    def __init__(self, port, payload=None):
        super().__init__(daemon=True)
        self.payload = payload
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((HOST_IP, port))
        self.sock.listen(1)
        self.sock.settimeout(SCRIPT_TIMEOUT)
        self.md5 = None
        self.size = 0
        self.seconds = None
        self.error = None
        self.start()

    def run(self):
        try:
            conn, _ = self.sock.accept()
            conn.settimeout(120)
            started = time.monotonic()
            with conn:
                if self.payload is not None:
                    conn.sendall(self.payload)
                    conn.shutdown(socket.SHUT_WR)
                    while conn.recv(4096):
                        pass
                    self.size = len(self.payload)
                else:
                    digest = hashlib.md5()
                    while True:
                        chunk = conn.recv(1 << 16)
                        if not chunk:
                            break
                        digest.update(chunk)
                        self.size += len(chunk)
                    self.md5 = digest.hexdigest()
            self.seconds = time.monotonic() - started
        except Exception as e:  # reported by the test
            self.error = e
        finally:
            self.sock.close()


class PostServer(Server):
    """Takes one HTTP POST (busybox wget --post-file writes its body in large chunks, unlike nc's
    1 KiB writes) and hashes the body. wget sends the file as a C string: text only."""

    def __init__(self, port):
        super().__init__(port)

    def run(self):
        try:
            conn, _ = self.sock.accept()
            conn.settimeout(120)
            started = time.monotonic()
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        raise AssertionError("POST headers cut short")
                    data += chunk
                head, body = data.split(b"\r\n\r\n", 1)
                length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                digest = hashlib.md5(body)
                self.size = len(body)
                while self.size < length:
                    chunk = conn.recv(1 << 16)
                    if not chunk:
                        break
                    digest.update(chunk)
                    self.size += len(chunk)
                self.seconds = time.monotonic() - started
                self.md5 = digest.hexdigest()
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")
        except Exception as e:  # reported by the test
            self.error = e
        finally:
            self.sock.close()


class Net(unittest.TestCase):
    rates = {}  # vhost mode -> (host->guest, guest->host nc, guest->host wget) in MiB/s

    @classmethod
    def tearDownClass(cls):
        for mode, (rx, tx, post) in sorted(cls.rates.items()):
            line = (f"net throughput vhost={mode}: host->guest {rx:.2f} MiB/s, guest->host "
                    f"{tx:.2f} MiB/s (nc), {post:.2f} MiB/s (wget)")
            print(line)
            sys.stderr.write(line + "\n")

    def setUp(self):
        subprocess.run(["ip", "link", "del", TAP], stderr=subprocess.DEVNULL)
        ip("tuntap", "add", "dev", TAP, "mode", "tap")
        ip("addr", "add", f"{HOST_IP}/24", "dev", TAP)
        ip("link", "set", TAP, "up")

    def tearDown(self):
        subprocess.run(["ip", "link", "del", TAP], stderr=subprocess.DEVNULL)

    def test_guest_reaches_the_host_through_a_tap(self):
        self.check_tap_networking("off")

    def test_guest_reaches_the_host_through_vhost_net(self):
        # No vhost= at all: kiln's default is vhost-net wherever the host has /dev/vhost-net.
        self.check_tap_networking("on", net=f"tap={TAP}")

    def check_tap_networking(self, vhost, net=None):
        payload = os.urandom(BULK_BYTES)
        to_guest = Server(5001, payload)
        from_guest = Server(5002)
        posted = PostServer(5004)
        no_offload_payload = os.urandom(NO_OFFLOAD_BYTES)
        no_offload = Server(5006, no_offload_payload)
        # The mask check's and the offload check's scripts are fetched from the host: the
        # command line has no room for them.
        Server(5005, MSIX_MASK_SCRIPT.format(host=HOST_IP).encode())
        Server(5007, OFFLOADS_SCRIPT.format(host=HOST_IP).encode())
        Server(5008, xdp_pass_object())
        script = f"""
ip link set eth0 up && ip addr add {GUEST_IP}/24 dev eth0 || echo net-setup=failed
echo mac=$(cat /sys/class/net/eth0/address)
ping -c 3 -W 10 {HOST_IP} > /tmp/ping 2>&1 && echo ping-host=ok || cat /tmp/ping
nc {HOST_IP} 5001 < /dev/null > /tmp/in.bin
echo rx-md5=$(md5sum < /tmp/in.bin | cut -d' ' -f1) rx-size=$(wc -c < /tmp/in.bin)
dd if=/dev/urandom of=/tmp/out.bin bs=1M count={TRANSFER_MIB} 2>/dev/null
echo tx-md5=$(md5sum < /tmp/out.bin | cut -d' ' -f1)
nc {HOST_IP} 5002 < /tmp/out.bin && echo tx-done
base64 /tmp/in.bin | tr -d '\\n' | head -c {BULK_BYTES} > /tmp/post.txt
rm /tmp/in.bin
echo post-md5=$(md5sum < /tmp/post.txt | cut -d' ' -f1)
wget -q -O /dev/null --post-file /tmp/post.txt http://{HOST_IP}:5004/ && echo post-done
nc {HOST_IP} 5007 < /dev/null > /tmp/offloads.sh && sh /tmp/offloads.sh
nc {HOST_IP} 5005 < /dev/null > /tmp/msix.sh && sh /tmp/msix.sh
dev=$(basename $(readlink /sys/class/net/eth0/device))
echo $dev > /sys/bus/virtio/drivers/virtio_net/unbind && echo $dev > /sys/bus/virtio/drivers/virtio_net/bind
ip link set eth0 up && ip addr add {GUEST_IP}/24 dev eth0 || echo rebind-setup=failed
ping -c 3 -W 10 {HOST_IP} > /tmp/ping 2>&1 && echo ping-after-rebind=ok || cat /tmp/ping
echo waiting-for-host
nc -l -p 5003 > /tmp/bye
echo host-said=$(cat /tmp/bye)
"""
        # KILN_LOG=debug: kiln reports the device's counters when it exits.
        os.environ["KILN_LOG"] = "debug"
        try:
            # iomem=relaxed: the guest's devmem may write the MSI-X table its driver claimed.
            run = kg.kiln("--net", net or f"tap={TAP},vhost={vhost}", script=script,
                          cmdline_extra="loglevel=5 iomem=relaxed")
        finally:
            del os.environ["KILN_LOG"]
        try:
            run.wait_for("waiting-for-host", timeout=SCRIPT_TIMEOUT)
            # vhost=on really moves the frames in the kernel: kiln holds /dev/vhost-net open.
            targets = set()
            for fd in os.listdir(f"/proc/{run.proc.pid}/fd"):
                try:
                    targets.add(os.readlink(f"/proc/{run.proc.pid}/fd/{fd}"))
                except OSError:  # closed meanwhile
                    pass
            self.assertEqual("/dev/vhost-net" in targets, vhost == "on", targets)
            console = run.console()
            self.assertIn(f"mac={fnv1a_mac(TAP)}", console)
            self.assertIn("ping-host=ok", console)
            self.assertNotIn("net-setup=failed", console)
            # The driver let go of the device and took it again (a device reset, as on reboot):
            # the data path stopped and restarted, and frames flow again.
            self.assertNotIn("rebind-setup=failed", console)
            self.assertIn("ping-after-rebind=ok", console)

            to_guest.join(30)
            from_guest.join(30)
            self.assertIsNone(to_guest.error)
            self.assertIsNone(from_guest.error)
            self.assertIn(f"rx-md5={hashlib.md5(payload).hexdigest()} rx-size={len(payload)}",
                          console)
            self.assertIn(f"tx-md5={from_guest.md5}", console)
            self.assertEqual(from_guest.size, TRANSFER_MIB << 20)
            self.assertIn("tx-done", console)
            self.assertIn("post-done", console)
            posted.join(30)
            self.assertIsNone(posted.error)
            self.assertEqual(posted.size, BULK_BYTES)
            self.assertIn(f"post-md5={posted.md5}", console)
            # rx-gro-hw is the guest's name for the TSO receive offloads it can switch with
            # VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET; with them off the tap segments for it.
            self.assertIn("gro-hw-before=1", console)
            self.assertIn("gro-hw-off=ok", console)
            self.assertIn("gro-hw-after=1", console)
            self.assertIn("gro-hw-on=ok", console)
            no_offload.join(30)
            self.assertIsNone(no_offload.error)
            self.assertIn(f"no-offload-md5={hashlib.md5(no_offload_payload).hexdigest()} "
                          f"no-offload-size={NO_OFFLOAD_BYTES}", console)
            for step in ("xdp-attach=ok", "xdp-progs=1", "xdp-ping=ok", "xdp-detach=ok"):
                self.assertIn(step, console)
            self.check_masked_receive_vector(console)
            bulk_mib = BULK_BYTES / (1 << 20)
            Net.rates[vhost] = (bulk_mib / to_guest.seconds, TRANSFER_MIB / from_guest.seconds,
                                bulk_mib / posted.seconds)
            rates = (f"net throughput vhost={vhost}: host->guest "
                     f"{bulk_mib / to_guest.seconds:.2f} MiB/s, "
                     f"guest->host {TRANSFER_MIB / from_guest.seconds:.2f} MiB/s with nc "
                     f"(1 KiB writes, {TRANSFER_MIB} MiB), {bulk_mib / posted.seconds:.2f} MiB/s "
                     f"with wget --post-file ({BULK_BYTES // 1000000} MB each way otherwise)")
            print(rates)
            sys.stderr.write(rates + "\n")

            self.assertEqual(ping(GUEST_IP), 3)

            # The tap is attached to the running VM: a second kiln cannot have it.
            busy = kg.kiln("--net", f"tap={TAP}", script="true")
            self.assertEqual(busy.wait(60), 2, busy.stderr)
            self.assertIn("busy", busy.stderr)

            # A connection the host opens to the guest works too; it lets the guest finish.
            with socket.create_connection((GUEST_IP, 5003), timeout=30) as s:
                s.sendall(b"bye\n")
            rc = run.wait(60)
        finally:
            if run.proc.poll() is None:
                run.kill()
        self.assertEqual(rc, 0, run.stderr)
        self.assertIn("host-said=bye", run.console())
        # The device's counters (kicks, interrupts, drops).
        for line in run.stderr.splitlines():
            if "virtio-net" in line:
                print(line)
        counters = re.search(r"(\d+) kernel data path starts \((\d+) rings with direct kicks, "
                             r"(\d+) with direct interrupts\)", run.stderr)
        self.assertIsNotNone(counters, run.stderr[-2000:])
        starts, kicks, calls = map(int, counters.groups())
        # Both ethtool -K commands and the driver's own around XDP, whichever data path ran the
        # rings.
        control = re.search(r"(\d+) control commands, (\d+) refused", run.stderr)
        self.assertIsNotNone(control, run.stderr[-2000:])
        self.assertEqual(tuple(map(int, control.groups())), (4, 0))
        if vhost == "on":
            # Started at boot and again after the rebind; the kernel took the guest's kicks from
            # KVM's ioeventfds and raised the irqfds itself on every ring.
            self.assertEqual((starts, kicks, calls), (2, 4, 4))
        else:
            self.assertEqual(starts, 0)

    def check_masked_receive_vector(self, console):
        """While the guest masked the receive queue's MSI-X vector, no interrupt reached it
        (its ping replies stayed in the ring), the PBA showed the vector pending, and unmasking
        delivered the interrupt. With vhost=on the kernel signals the vector's irqfd itself."""
        found = re.search(r"msix-mask entry=(\d+) before=(\d+) during=(\d+) after=(\d+) "
                          r"pending=(\d)", console)
        self.assertIsNotNone(found, console[-3000:])
        entry, before, during, after, pending = map(int, found.groups())
        print(f"masked receive vector (MSI-X entry {entry}): interrupts {before} -> {during} "
              f"while masked -> {after} after unmask, pending bit {pending}")
        self.assertIn("masked-ping=lost", console)
        self.assertEqual(during, before)
        self.assertEqual(pending, 1)
        self.assertGreater(after, during)
        self.assertIn("ping-after-unmask=ok", console)

    def test_bad_macs_are_usage_errors(self):
        for mac, why in (("01:00:5e:00:00:01", "multicast"), ("52:54:00:zz:00:01", "malformed")):
            run = kg.kiln("--net", f"tap={TAP},mac={mac}", script="true")
            self.assertEqual(run.wait(60), 2, run.stderr)
            self.assertIn(why, run.stderr)


if __name__ == "__main__":
    unittest.main(verbosity=2)
