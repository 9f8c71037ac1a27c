// kiln-img on images with extended L2 entries (subclusters): create, info, map, check and
// convert print what qemu-img prints for the same files.
#include <fmt/format.h>

#include "img/tests/img_test_util.h"

namespace kiln::img {
namespace {

using block::qcow2::testing::write_file_at;
using testing::ImgToolTest;

class ExtendedL2ImgTest : public ImgToolTest {
 protected:
  // A QEMU-made image over a raw backing file with every kind of subcluster.
  void make_qemu_image(const std::string& name, const std::string& cluster_size) {
    sh("qemu-img create -q -f raw base.raw 4M && qemu-io -f raw -c 'write -P 0xaa 0 4M' base.raw");
    sh(fmt::format(
        "qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size={} -b base.raw -F raw {} 6M",
        cluster_size, name));
    sh(
        fmt::format("qemu-io -c 'write -P 1 4k 2k' -c 'write -P 2 70k 1k' -c 'write -z 128k 2k' "
                    "-c 'write -z 192k 64k' -c 'write -P 3 256k 64k' -c 'write -z 260k 4k' "
                    "-c 'write -P 4 3M 8k' -c 'discard 2M 2M' -c 'write -P 5 5M 64k' {}",
                    name));
  }
};

TEST_F(ExtendedL2ImgTest, CreatePrintsAndWritesWhatQemuDoes) {
  expect_same("create -f qcow2 -o extended_l2=on,cluster_size=64k e.qcow2 4M");
  ASSERT_EQ(kiln("create -q -f qcow2 -o extended_l2=on k.qcow2 4M").status, 0);
  expect_check_clean("k.qcow2");
  // Both tools describe kiln's image the same way, "extended l2: true" included.
  const auto info = expect_same("info k.qcow2");
  EXPECT_NE(info.out.find("    extended l2: true\n"), std::string::npos) << info.out;
  const auto json = expect_same("info --output=json k.qcow2");
  EXPECT_NE(json.out.find("\"extended-l2\": true"), std::string::npos) << json.out;
  // Too small a cluster, or compat 0.10: the same refusal (and the same "Formatting" line).
  expect_same("create -f qcow2 -o extended_l2=on,cluster_size=8k s.qcow2 1M");
  expect_same("create -f qcow2 -o extended_l2=on,compat=0.10 v2.qcow2 1M");
  expect_same("create -f qcow2 -o extended_l2=off,cluster_size=8k off.qcow2 1M");
}

TEST_F(ExtendedL2ImgTest, MapIsPerSubclusterLikeQemu) {
  for (const char* cs : {"64k", "2M"}) {
    const std::string name = fmt::format("m{}.qcow2", cs);
    make_qemu_image(name, cs);
    const auto json = expect_same(fmt::format("map --output=json {}", name));
    EXPECT_NE(json.out.find("\"depth\": 1"), std::string::npos) << json.out;
    expect_same(fmt::format("map {}", name));
    expect_same(fmt::format("check {}", name));
  }
  // Without a backing file unallocated subclusters of an allocated cluster still name it.
  sh("qemu-img create -q -f qcow2 -o extended_l2=on solo.qcow2 1M");
  sh("qemu-io -c 'write -P 1 4k 2k' -c 'write -z 64k 2k' solo.qcow2");
  expect_same("map --output=json solo.qcow2");
  sh("qemu-img create -q -f qcow2 -o extended_l2=on,preallocation=metadata pre.qcow2 1M");
  expect_same("map --output=json pre.qcow2");
}

TEST_F(ExtendedL2ImgTest, ConvertAndCompareWithQemu) {
  make_qemu_image("src.qcow2", "64k");
  // kiln-img writes an extended L2 image from it; QEMU checks it and reads the same bytes.
  ASSERT_EQ(kiln("convert -O qcow2 -o extended_l2=on,cluster_size=32k src.qcow2 k.qcow2").status,
            0);
  expect_check_clean("k.qcow2");
  expect_same_content("src.qcow2", "k.qcow2");
  const auto cmp = expect_same("compare src.qcow2 k.qcow2");
  EXPECT_EQ(cmp.out, "Images are identical.\n");
  ASSERT_EQ(kiln("convert -O raw src.qcow2 k.raw").status, 0);
  sh("qemu-img convert -O raw src.qcow2 q.raw && cmp k.raw q.raw");
}

TEST_F(ExtendedL2ImgTest, CheckReportsBadBitmapsLikeQemu) {
  // 64 KiB clusters: L2 table at 0x40000, 16-byte entries; bitmap = second 8 bytes.
  sh("qemu-img create -q -f qcow2 -o extended_l2=on bad.qcow2 1M");
  sh("qemu-io -c 'write -P 1 0 4k' -c 'write -P 3 128k 64k' bad.qcow2");
  write_file_at(path("bad.qcow2"), 0x40008, {0, 0, 0, 1, 0, 0, 0, 1});
  // Same report on stdout and the same error line on stderr (qemu-img's own, no prefix).
  const auto r = kiln("check bad.qcow2"), qr = qemu("check bad.qcow2");
  EXPECT_EQ(r.status, 2);
  EXPECT_EQ(r.status, qr.status);
  EXPECT_EQ(r.out, qr.out);
  EXPECT_EQ(r.err, qr.err);
  EXPECT_EQ(r.err,
            "ERROR offset=50000: Allocated cluster has corrupted subcluster allocation "
            "bitmap\n");
  // Reading the broken cluster fails with a clear error in both tools.
  const auto k = kiln("convert -O raw bad.qcow2 out.raw");
  EXPECT_NE(k.status, 0);
  EXPECT_NE(k.err.find("subcluster"), std::string::npos) << k.err;
  EXPECT_NE(qemu("convert -O raw bad.qcow2 out.raw").status, 0);
}

}  // namespace
}  // namespace kiln::img
