// kiln-img compare against qemu-img compare: same stdout and exit code on the same images.
#include "img/tests/img_test_util.h"

namespace kiln::img::testing {
namespace {

class CompareTest : public ImgToolTest {
 protected:
  void SetUp() override {
    ImgToolTest::SetUp();
    sh("qemu-img create -q -f qcow2 empty.qcow2 1M");
    sh("qemu-img create -q -f qcow2 a.qcow2 1M");
    sh("qemu-io -c 'write -P 0x11 0 100k' -c 'write -P 0x22 300k 4k' -c 'write -z 400k 64k' "
       "a.qcow2 >/dev/null");
    sh("qemu-img convert -O raw a.qcow2 a.raw");
    sh("qemu-img convert -O qcow2 -o cluster_size=512 a.qcow2 a512.qcow2");
    sh("qemu-img convert -O qcow2 -o compat=0.10 a.qcow2 av2.qcow2");
    sh("qemu-img convert -c -O qcow2 a.qcow2 acomp.qcow2");
    // One byte different inside a sector (reported at the sector's start).
    sh("cp a.qcow2 b.qcow2 && qemu-io -c 'write -P 0x33 9000 1' b.qcow2 >/dev/null");
    // Data where a.qcow2 has none.
    sh("cp a.qcow2 c.qcow2 && qemu-io -c 'write -P 0x44 700000 1' c.qcow2 >/dev/null");
    // Explicit zeros where a.qcow2 is unallocated: equal content, different allocation.
    sh("cp a.qcow2 d.qcow2 && qemu-io -c 'write -P 0 600k 64k' d.qcow2 >/dev/null");
    // Bigger images: zeros past 1M, then data past 1M.
    sh("qemu-img convert -O qcow2 a.qcow2 big.qcow2 && qemu-img resize -q big.qcow2 2M");
    sh("cp big.qcow2 bigdata.qcow2 && qemu-io -c 'write -P 5 1500000 10' bigdata.qcow2 >/dev/null");
    sh("cp a.raw bigdata.raw && truncate -s 2M bigdata.raw && "
       "qemu-io -f raw -c 'write -P 6 1100k 1k' bigdata.raw >/dev/null");
    // A chain whose top changes part of its base.
    sh("qemu-img create -q -f qcow2 -b a.qcow2 -F qcow2 top.qcow2");
    sh("qemu-io -c 'write -P 0x55 64k 8k' -c 'write -z 0 4k' top.qcow2 >/dev/null");
    sh("qemu-img convert -O raw top.qcow2 top.raw");
    sh("qemu-img create -q -f qcow2 -b a.raw -F raw rawtop.qcow2 2M");
    sh("echo notanimage > text.txt");
  }
};

TEST_F(CompareTest, OutputAndExitCodesMatchQemu) {
  const std::vector<std::string> cases = {
      "compare a.qcow2 a.qcow2",
      "compare empty.qcow2 empty.qcow2",
      "compare a.qcow2 empty.qcow2",
      "compare empty.qcow2 a.qcow2",
      "compare a.qcow2 a.raw",
      "compare -f qcow2 -F raw a.qcow2 a.raw",
      "compare a.raw a512.qcow2",
      "compare a.qcow2 av2.qcow2",
      "compare a.qcow2 acomp.qcow2",
      "compare a.qcow2 b.qcow2",
      "compare b.qcow2 a.raw",
      "compare -q a.qcow2 b.qcow2",
      "compare -q a.qcow2 a.raw",
      "compare a.qcow2 c.qcow2",
      "compare c.qcow2 a.qcow2",
      "compare a.qcow2 d.qcow2",
      "compare a.qcow2 big.qcow2",
      "compare big.qcow2 a.raw",
      "compare a.qcow2 bigdata.qcow2",
      "compare bigdata.raw a.qcow2",
      "compare -s a.qcow2 big.qcow2",
      "compare -s a.qcow2 a.qcow2",
      "compare -s a.qcow2 b.qcow2",
      "compare -s a.qcow2 a.raw",
      "compare -s a.qcow2 d.qcow2",
      "compare -s a.qcow2 a512.qcow2",
      "compare -s a.qcow2 acomp.qcow2",
      "compare -s top.qcow2 top.raw",
      "compare -s a.raw a.raw",
      "compare top.qcow2 top.raw",
      "compare top.qcow2 a.qcow2",
      "compare rawtop.qcow2 big.qcow2",
      "compare -p a.qcow2 a.qcow2",
      "compare -p -q a.qcow2 b.qcow2",
      "compare -U a.qcow2 a.raw",
      "compare -T none a.qcow2 a.raw",
      "compare -f raw a.qcow2 a.qcow2",
      "compare -f raw a.qcow2 a.raw",
      "compare -F raw a.raw a.raw",
      // Errors.
      "compare a.qcow2",
      "compare a.qcow2 a.raw b.qcow2",
      "compare",
      "compare a.qcow2 missing.qcow2",
      "compare missing.qcow2 a.qcow2",
      "compare -f bogus a.qcow2 a.qcow2",
      "compare -f qcow2 a.raw a.qcow2",
      "compare -F qcow2 a.qcow2 text.txt",
      "compare -T bogus a.qcow2 a.qcow2",
      "compare -x a.qcow2 a.qcow2",
      "compare a.qcow2 a.qcow2 -f",
  };
  for (const auto& c : cases) expect_same(c);
}

TEST_F(CompareTest, MismatchOffsetsMatchQemuEverywhere) {
  // Single differing bytes at awkward places, in images of two cluster sizes.
  for (const char* cs : {"64k", "4k"}) {
    for (uint64_t off : {0ull, 511ull, 512ull, 65535ull, 65536ull, 1000000ull, 1048575ull}) {
      sh(fmt::format("qemu-img convert -O qcow2 -o cluster_size={} a.qcow2 x.qcow2", cs));
      sh(fmt::format("qemu-io -c 'write -P 0x77 {} 1' x.qcow2 >/dev/null", off));
      expect_same("compare a.qcow2 x.qcow2");
      expect_same("compare x.qcow2 a.raw");
      expect_same("compare empty.qcow2 x.qcow2");
    }
  }
}

TEST_F(CompareTest, LockedImageNeedsForceShare) {
  block::qcow2::OpenOptions o;
  o.read_only = false;
  auto writer = block::qcow2::Image::open(path("a.qcow2"), o);
  auto r = kiln("compare a.qcow2 a.raw");
  EXPECT_EQ(r.status, 2) << r.out << r.err;
  EXPECT_NE(r.err.find("lock"), std::string::npos) << r.err;
  r = kiln("compare -U a.qcow2 a.raw");
  EXPECT_EQ(r.status, 0) << r.out << r.err;
  EXPECT_EQ(r.out, "Images are identical.\n");
}

}  // namespace
}  // namespace kiln::img::testing
