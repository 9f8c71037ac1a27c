// kiln-img snapshot -l and info on images with internal snapshots, against qemu-img.
#include <nlohmann/json.hpp>

#include "block/qcow2/qcow2_format.h"
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
           "snapshot -c x missing.qcow2",
       }) {
    expect_same(args);
  }
}

// One-bit refcounts cannot hold a snapshot: both tools refuse; kiln's image stays consistent.
TEST_F(SnapshotTest, OneBitRefcountsRefuseSnapshots) {
  sh("qemu-img create -q -f qcow2 -o refcount_bits=1 k.qcow2 1M && "
     "qemu-io -c 'write -P 1 0 100k' k.qcow2 >/dev/null && cp k.qcow2 q.qcow2");
  auto k = kiln("snapshot -c s k.qcow2"), qm = qemu("snapshot -c s q.qcow2");
  EXPECT_EQ(k.status, 1) << k.err;
  EXPECT_EQ(k.status, qm.status);
  EXPECT_EQ(k.out, qm.out);
  expect_check_clean("k.qcow2");
  expect_same_content("k.qcow2", "q.qcow2");
  EXPECT_EQ(kiln("snapshot -l k.qcow2").out, "");
}

// A damaged snapshot table is an error message, never a crash or a write.
TEST_F(SnapshotTest, DamagedSnapshotTableIsACleanError) {
  // s.qcow2: header field 60 = nb_snapshots, 64 = snapshots_offset.
  const auto header = read_file(path("s.qcow2"));
  const uint64_t table = block::qcow2::load_be64(&header[64]);
  auto damaged = [&](uint64_t offset, std::vector<uint8_t> bytes) {
    sh("cp s.qcow2 d.qcow2");
    block::qcow2::testing::write_file_at(path("d.qcow2"), offset, bytes);
    const auto before = read_file(path("d.qcow2"));
    for (const char* args : {"snapshot -l d.qcow2", "info d.qcow2", "snapshot -d first d.qcow2",
                             "snapshot -c new d.qcow2", "snapshot -a 1 d.qcow2"}) {
      auto r = kiln(args);
      EXPECT_EQ(r.status, 1) << args << "\n" << r.out << r.err;
      EXPECT_EQ(r.err.rfind("kiln-img: ", 0), 0u) << args << "\n" << r.err;
    }
    EXPECT_EQ(read_file(path("d.qcow2")), before);
  };
  damaged(table + 36, {0, 0, 0x10, 0});  // extra data size 1 MiB
  damaged(table + 14, {0xff, 0xff});     // name runs past the end of the file
  damaged(60, {0, 0, 0x10, 0});          // 4096 snapshots: the table runs out
}

// Snapshot table lines without the DATE column (the tools ran at different moments).
std::string without_dates(const std::string& list) {
  std::string out, line;
  for (char c : list) {
    if (c != '\n') {
      line += c;
      continue;
    }
    if (line.size() > 66 && line.compare(0, 2, "ID") != 0) line.erase(line.size() - 43, 19);
    out += line + "\n";
    line.clear();
  }
  return out;
}

// The same create/write/apply/delete sequence by each tool, on several image layouts; after
// every step the images pass qemu-img check, read the same, and list the same snapshots, and
// qemu reads kiln's snapshots (and kiln applies qemu's) with the contents they were taken with.
TEST_F(SnapshotTest, CreateApplyDeleteInteropWithQemu) {
  for (const char* opts :
       {"", "-o cluster_size=512", "-o refcount_bits=64,cluster_size=4k", "-o compat=0.10"}) {
    sh("rm -rf k q && mkdir k q");
    sh(fmt::format("qemu-img create -q -f qcow2 {} k/t.qcow2 3M", opts));
    sh("qemu-io -c 'write -P 1 0 1M' -c 'write -P 5 2M 64k' k/t.qcow2 >/dev/null");
    sh("cp k/t.qcow2 q/t.qcow2 && qemu-img convert -O raw k/t.qcow2 one.raw");
    auto step = [&](const std::string& args, int status = 0) {
      auto k = kiln(args + " k/t.qcow2"), qm = qemu(args + " q/t.qcow2");
      EXPECT_EQ(k.status, status) << opts << " " << args << "\n" << k.err;
      EXPECT_EQ(k.status, qm.status) << opts << " " << args << "\n" << qm.err;
      EXPECT_EQ(k.out, qm.out) << opts << " " << args;
      expect_check_clean("k/t.qcow2");
      expect_same_content("k/t.qcow2", "q/t.qcow2");
      EXPECT_EQ(without_dates(kiln("snapshot -l k/t.qcow2").out),
                without_dates(qemu("snapshot -l q/t.qcow2").out))
          << opts << " " << args;
    };
    auto write = [&](const std::string& cmds) {
      sh(fmt::format("qemu-io {} k/t.qcow2 >/dev/null && qemu-io {} q/t.qcow2 >/dev/null", cmds,
                     cmds));
      expect_check_clean("k/t.qcow2");
    };
    step("snapshot -c one");
    write("-c 'write -P 2 100k 200k' -c 'write -z 2M 64k' -c 'write -P 6 2500k 1k'");
    sh("qemu-img convert -O raw k/t.qcow2 two.raw");
    step("snapshot -c two");
    step("snapshot -c one");  // a second snapshot called "one" (ID 3)
    write("-c 'write -P 3 0 3M'");
    // qemu reads kiln's snapshots as they were taken.
    sh("qemu-img convert -l snapshot.id=1 -O raw k/t.qcow2 k1.raw");
    sh("qemu-img convert -l snapshot.name=two -O raw k/t.qcow2 k2.raw");
    EXPECT_EQ(read_file(path("k1.raw")), read_file(path("one.raw"))) << opts;
    EXPECT_EQ(read_file(path("k2.raw")), read_file(path("two.raw"))) << opts;
    step("snapshot -a one");  // by name: the first "one"
    expect_same_content("k/t.qcow2", "one.raw");
    step("snapshot -a 2");  // by ID
    expect_same_content("k/t.qcow2", "two.raw");
    step("snapshot -d one");   // by name only: the first "one"
    step("snapshot -d 3", 1);  // not a name
    step("snapshot -d nope", 1);
    step("snapshot -d one");
    write("-c 'write -P 4 1M 512k'");
    step("snapshot -d two");
    // qemu's snapshots, applied and deleted by kiln.
    sh("qemu-img snapshot -c q1 k/t.qcow2 && qemu-io -c 'write -P 7 0 2M' k/t.qcow2 >/dev/null");
    sh("qemu-img convert -l snapshot.name=q1 -O raw k/t.qcow2 q1.raw");
    auto r = kiln("snapshot -a q1 k/t.qcow2");
    EXPECT_EQ(r.status, 0) << r.err;
    expect_check_clean("k/t.qcow2");
    expect_same_content("k/t.qcow2", "q1.raw");
    EXPECT_EQ(kiln("snapshot -d q1 k/t.qcow2").status, 0);
    expect_check_clean("k/t.qcow2");
    EXPECT_EQ(qemu("snapshot -l k/t.qcow2").out, "");
  }
}

}  // namespace
}  // namespace kiln::img::testing
