// kiln-img measure against qemu-img measure: identical numbers, output and exit codes.
#include "img/tests/img_test_util.h"

namespace kiln::img::testing {
namespace {

class MeasureTest : public ImgToolTest {};

TEST_F(MeasureTest, SizeMatrixMatchesQemuExactly) {
  int cases = 0;
  for (const char* size : {"0", "1", "512", "1M", "1000000", "1G", "3.5G", "1T", "16T"}) {
    for (const char* opts :
         {"", "-o cluster_size=512", "-o cluster_size=4k,refcount_bits=1",
          "-o cluster_size=2M,refcount_bits=64", "-o compat=0.10", "-o preallocation=full",
          "-o preallocation=metadata,lazy_refcounts=on", "-o extended_l2=on,cluster_size=32k",
          "-o refcount_bits=8,backing_file=x.qcow2"}) {
      expect_same(fmt::format("measure -O qcow2 {} --size {}", opts, size));
      ++cases;
    }
    expect_same(fmt::format("measure --size {}", size));
    expect_same(fmt::format("measure -O raw --output=json --size {}", size));
    expect_same(fmt::format("measure -O qcow2 --output=json --size {}", size));
    cases += 3;
  }
  EXPECT_GE(cases, 100);
}

TEST_F(MeasureTest, InputImagesMatchQemuExactly) {
  sh("qemu-img create -q -f qcow2 empty.qcow2 10M");
  sh("qemu-img create -q -f qcow2 a.qcow2 10M");
  sh("qemu-io -c 'write -P 1 0 100k' -c 'write -P 2 3M 1M' -c 'write -z 5M 1M' "
     "-c 'write -P 3 9000000 4097' a.qcow2 >/dev/null");
  sh("qemu-img convert -O raw a.qcow2 a.raw");
  sh("qemu-img convert -c -O qcow2 a.qcow2 comp.qcow2");
  sh("qemu-img convert -O qcow2 -o compat=0.10,cluster_size=4k a.qcow2 v2.qcow2");
  sh("qemu-img create -q -f qcow2 -b a.qcow2 -F qcow2 top.qcow2 12M");
  sh("qemu-io -c 'write -P 4 2M 64k' -c 'write -z 0 64k' -c 'write -P 5 11M 512' top.qcow2 "
     ">/dev/null");
  sh("qemu-img create -q -f raw odd.raw 1000001 && "
     "qemu-io -f raw -c 'write -P 7 4096 10' odd.raw >/dev/null");
  // qemu-io zeroes the tail of a newly allocated cluster with fallocate(ZERO_RANGE): ext4 keeps
  // it unwritten, and SEEK_HOLE calls it a hole or data depending on whether its pages happen to
  // be in the page cache. Both tools ask SEEK_HOLE, so read everything once to fix the answer.
  sh("cat *.qcow2 *.raw > /dev/null");
  int cases = 0;
  for (const char* in : {"empty.qcow2", "a.qcow2", "-f raw a.raw", "a.raw", "comp.qcow2",
                         "v2.qcow2", "top.qcow2", "-f raw odd.raw"}) {
    for (const char* out :
         {"", "-O qcow2", "-O qcow2 -o cluster_size=4k", "-O qcow2 -o cluster_size=2M,compat=0.10",
          "-O qcow2 --output=json", "-O qcow2 -o preallocation=falloc",
          "-O qcow2 -o backing_file=a.qcow2"}) {
      expect_same(fmt::format("measure {} {}", out, in));
      ++cases;
    }
  }
  EXPECT_GE(cases, 50);
}

// Both tools ask the host file about data clusters: a hole punched inside one is not counted.
TEST_F(MeasureTest, HostHolesInsideDataClustersAreNotCounted) {
  sh("qemu-img create -q -f qcow2 h.qcow2 4M && qemu-io -c 'write -P 9 1M 128k' h.qcow2 "
     ">/dev/null");
  const std::string map = sh("qemu-img map --output=json h.qcow2");
  const auto at = map.find("\"offset\": ");
  ASSERT_NE(at, std::string::npos) << map;
  const uint64_t host = std::stoull(map.substr(at + 10));
  sh(fmt::format("fallocate --punch-hole -o {} -l 61440 h.qcow2", host + 4096));
  for (const char* out : {"-O qcow2 -o cluster_size=4k", "-O qcow2 -o cluster_size=512", "-O raw"})
    expect_same(fmt::format("measure {} h.qcow2", out));
  expect_same("compare -s h.qcow2 h.qcow2");
}

TEST_F(MeasureTest, BadInputMatchesQemu) {
  sh("qemu-img create -q -f qcow2 a.qcow2 1M && echo hello > text.txt");
  for (const char* args : {
           "measure",
           "measure --size 1G a.qcow2",
           "measure a.qcow2 a.qcow2",
           "measure --size 1x",
           "measure --size -5",
           "measure -O bogus --size 1G",
           "measure -O vmdk --size 1G",
           "measure -O qcow2 -o bogus=1 --size 1G",
           "measure -O raw -o cluster_size=4k --size 1G",
           "measure -O qcow2 -o cluster_size=1000 --size 1G",
           "measure -O qcow2 -o cluster_size=4M --size 1G",
           "measure -O qcow2 -o cluster_size=abc --size 1G",
           "measure -O qcow2 -o compat=0.10,refcount_bits=1 --size 1G",
           "measure -O qcow2 -o refcount_bits=3 --size 1G",
           "measure -O qcow2 -o refcount_bits=x --size 1G",
           "measure -O qcow2 -o compat=2 --size 1G",
           "measure -O qcow2 -o lazy_refcounts=maybe --size 1G",
           "measure -O qcow2 -o preallocation=bogus --size 1G",
           "measure -O qcow2 -o extended_l2=on,cluster_size=4k --size 1G",
           "measure -O qcow2 -o cluster_size=512 --size 100P",
           "measure -f qcow2 --size 1G",
           "measure --output=xml --size 1",
           "measure missing.qcow2",
           "measure -f qcow2 text.txt",
           "measure -f bogus a.qcow2",
       }) {
    expect_same(args);
  }
  // qemu-img measure answers an unknown or incomplete option with its help and status 0.
  for (const char* args : {"measure -x --size 1G", "measure --size"}) {
    auto k = kiln(args), qm = qemu(args);
    EXPECT_EQ(k.status, qm.status) << args;
    EXPECT_EQ(k.status, 0) << args;
    EXPECT_NE(k.out.find("measure [--output=ofmt]"), std::string::npos) << k.out;
  }
}

}  // namespace
}  // namespace kiln::img::testing
