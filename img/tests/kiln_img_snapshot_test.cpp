// kiln-img snapshot -l and info on images with internal snapshots, against qemu-img.
#include <nlohmann/json.hpp>

#include "img/tests/img_test_util.h"

namespace kiln::img::testing {
namespace {

class SnapshotTest : public ImgToolTest {
 protected:
  void SetUp() override {
    ImgToolTest::SetUp();
    sh("qemu-img create -q -f qcow2 s.qcow2 1M");
    sh("qemu-io -c 'write -P 1 0 100k' s.qcow2 >/dev/null && qemu-img snapshot -c first s.qcow2");
    sh("qemu-io -c 'write -P 2 0 64k' s.qcow2 >/dev/null");
    sh("qemu-img snapshot -c 'a much longer snapshot name' s.qcow2");
    sh("qemu-img snapshot -c first s.qcow2");  // qemu allows a repeated name
    sh("qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=512 v2.qcow2 1M");
    sh("qemu-io -c 'write -P 3 0 10k' v2.qcow2 >/dev/null && qemu-img snapshot -c s1 v2.qcow2");
    sh("qemu-img snapshot -c s2 v2.qcow2 && qemu-img snapshot -d s1 v2.qcow2");
    sh("qemu-img create -q -f qcow2 empty.qcow2 1M && qemu-img create -q -f raw r.raw 1M");
  }
};

TEST_F(SnapshotTest, ListAndInfoMatchQemu) {
  for (const char* img : {"s.qcow2", "v2.qcow2", "empty.qcow2", "r.raw"}) {
    expect_same(fmt::format("snapshot -l {}", img));
    expect_same(fmt::format("snapshot -l -U {}", img));
    expect_same(fmt::format("info {}", img));
    // (Without an action qemu-img opens read-write and warns about a probed raw image.)
    if (std::string(img) != "r.raw") expect_same(fmt::format("snapshot {}", img));
    auto k = kiln(fmt::format("info --output=json {}", img));
    auto qm = qemu(fmt::format("info --output=json {}", img));
    EXPECT_EQ(nlohmann::json::parse(k.out), nlohmann::json::parse(qm.out)) << img;
  }
}

TEST_F(SnapshotTest, BadInputMatchesQemu) {
  for (const char* args : {
           "snapshot",
           "snapshot -l",
           "snapshot -l s.qcow2 v2.qcow2",
           "snapshot -l -c x s.qcow2",
           "snapshot -a first -d first s.qcow2",
           "snapshot -l missing.qcow2",
           "snapshot -x s.qcow2",
           "snapshot -c",
           "snapshot -d nope s.qcow2",
           "snapshot -a nope s.qcow2",
           "snapshot -c x r.raw",
       }) {
    expect_same(args);
  }
}

}  // namespace
}  // namespace kiln::img::testing
