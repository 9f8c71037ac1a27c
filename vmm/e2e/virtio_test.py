"""End-to-end tests of kiln's PCI/virtio devices with a real guest on a real KVM (inside
tools/kvm-sandbox): virtio-blk on raw and qcow2 images, read-only disks, serials, virtio-rng."""
import hashlib
import os
import re
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "../../tests/support"))
import kiln_guest as kg  # noqa: E402

BOOT_TIMEOUT = 240
WORK = os.path.join(kg.E2E_DIR, "virtio-test")


def boot(script, *args, memory="512M"):
    run = kg.kiln(*args, script=script, memory=memory)
    rc = run.wait(BOOT_TIMEOUT)
    return run, rc


def image(name, size_mb, fmt="raw"):
    os.makedirs(WORK, exist_ok=True)
    path = os.path.join(WORK, name)
    if os.path.exists(path):
        os.unlink(path)
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, path, f"{size_mb}M"], check=True)
    return path


class Disk(unittest.TestCase):
    def test_filesystem_written_in_one_boot_reads_back_in_the_next(self):
        disk = image("fs.img", 64)
        write = ("mke2fs -q /dev/vda && mount /dev/vda /mnt && "
                 "dd if=/dev/urandom of=/mnt/blob bs=1M count=8 2>/dev/null && "
                 "echo hello-disk > /mnt/note && md5sum /mnt/blob | cut -d' ' -f1 > /mnt/blob.md5 && "
                 "cat /mnt/blob.md5 && umount /mnt && echo written")
        run, rc = boot(write, "--disk", f"path={disk}")
        self.assertEqual(rc, 0, run.stderr)
        self.assertIn("written", run.console())
        first_md5 = re.search(r"^([0-9a-f]{32})$", run.console(), re.M).group(1)
        read = ("mount /dev/vda /mnt && cat /mnt/note && echo md5=$(md5sum /mnt/blob | cut -d' ' -f1) "
                "&& echo stored=$(cat /mnt/blob.md5)")
        run, rc = boot(read, "--disk", f"path={disk}")
        self.assertEqual(rc, 0, run.stderr)
        self.assertIn("hello-disk", run.console())
        self.assertIn(f"md5={first_md5}", run.console())
        self.assertIn(f"stored={first_md5}", run.console())

    def test_qcow2_image_written_by_the_guest_is_consistent_for_qemu_img(self):
        # vda goes through the host page cache; vdb is cache=none (O_DIRECT), and its 512-byte
        # writes into one 4 KiB host block take the read-modify-write path.
        disks = [image("guest.qcow2", 128, "qcow2"), image("direct.qcow2", 128, "qcow2")]
        script = ("dd if=/dev/urandom of=/tmp/data bs=1M count=16 2>/dev/null && "
                  "dd if=/tmp/data of=/dev/vda bs=1M seek=3 conv=fsync 2>/dev/null && "
                  "dd if=/tmp/data of=/dev/vdb bs=1M seek=3 conv=fsync 2>/dev/null && "
                  "dd if=/tmp/data of=/dev/vdb bs=512 seek=1 count=7 oflag=direct 2>/dev/null && "
                  "echo md5=$(md5sum < /tmp/data) head=$(head -c 3584 /tmp/data | md5sum) "
                  "vdb=$(dd if=/dev/vdb bs=1M skip=3 count=16 iflag=direct 2>/dev/null | md5sum)")
        run, rc = boot(script, "--disk", f"path={disks[0]},format=qcow2",
                       "--disk", f"path={disks[1]},format=qcow2,cache=none")
        self.assertEqual(rc, 0, run.stderr + run.console()[-2000:])
        sums = dict(re.findall(r"(md5|head|vdb)=([0-9a-f]{32})", run.console()))
        self.assertEqual(sums.get("vdb"), sums["md5"], run.console()[-2000:])
        for disk in disks:
            check = subprocess.run(["qemu-img", "check", disk], capture_output=True, text=True)
            self.assertEqual(check.returncode, 0, check.stdout + check.stderr)
            raw = disk + ".raw"
            subprocess.run(["qemu-img", "convert", "-O", "raw", disk, raw], check=True)
            with open(raw, "rb") as f:
                f.seek(3 << 20)
                self.assertEqual(hashlib.md5(f.read(16 << 20)).hexdigest(), sums["md5"], disk)
                if disk == disks[1]:
                    f.seek(512)
                    self.assertEqual(hashlib.md5(f.read(3584)).hexdigest(), sums["head"])

    def test_read_only_disk_refuses_writes_and_serial_is_visible(self):
        disk = image("ro.img", 16)
        script = ("echo ro=$(cat /sys/block/vda/ro); echo serial=$(cat /sys/block/vda/serial); "
                  "if dd if=/dev/zero of=/dev/vda bs=4k count=1 conv=fsync 2>/dev/null; "
                  "then echo write=accepted; else echo write=refused; fi")
        run, rc = boot(script, "--disk", f"path={disk},readonly=on,serial=kiln-ro-1")
        self.assertEqual(rc, 0, run.stderr)
        self.assertIn("ro=1", run.console())
        self.assertIn("serial=kiln-ro-1", run.console())
        self.assertIn("write=refused", run.console())
        with open(disk, "rb") as f:
            self.assertEqual(f.read(4096), bytes(4096))

    def test_a_queue_per_vcpu(self):
        disk = image("mq.img", 16)
        run, rc = boot("echo queues=$(ls /sys/block/vda/mq | wc -l)", "--cpus", "2",
                       "--disk", f"path={disk}")
        self.assertEqual(rc, 0, run.stderr)
        self.assertIn("queues=2", run.console())


class Rng(unittest.TestCase):
    def test_guest_reads_entropy_from_virtio_rng(self):
        script = ("echo current=$(cat /sys/class/misc/hw_random/rng_current); "
                  "echo bytes=$(dd if=/dev/hwrng bs=64 count=1 2>/dev/null | od -An -tx1 | tr -d ' \\n')")
        run, rc = boot(script, "--rng")
        self.assertEqual(rc, 0, run.stderr)
        self.assertIn("current=virtio_rng", run.console())
        hexbytes = re.search(r"bytes=([0-9a-f]*)", run.console()).group(1)
        self.assertEqual(len(hexbytes), 128)
        self.assertNotEqual(hexbytes, "0" * 128)


if __name__ == "__main__":
    unittest.main(verbosity=2)
