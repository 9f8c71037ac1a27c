// Untrusted images: every malformed field gives a clear error, never a crash. Also check/repair,
// header extension preservation, locking and the BlockDevice adapter.
#include <fcntl.h>
#include <fmt/format.h>

#include <future>

#include "block/qcow2/file_io.h"
#include "block/qcow2/qcow2.h"
#include "block/qcow2/qcow2_device.h"
#include "block/qcow2/tests/test_util.h"

namespace kiln::block::qcow2 {
namespace {

using testing::must;
using testing::q;
using testing::read_file;
using testing::run;
using testing::TempDir;
using testing::write_file_at;

std::vector<uint8_t> be64(uint64_t v) {
  std::vector<uint8_t> b(8);
  store_be64(b.data(), v);
  return b;
}
std::vector<uint8_t> be32(uint32_t v) {
  std::vector<uint8_t> b(4);
  store_be32(b.data(), v);
  return b;
}

class RobustnessTest : public ::testing::Test {
 protected:
  void SetUp() override {
    testing::require_qemu_tools();
    img_ = dir_ / "t.qcow2";
    // Layout (64 KiB clusters): header 0, refcount table 0x10000, block 0x20000, L1 0x30000,
    // L2 0x40000, data 0x50000.
    must(fmt::format("qemu-img create -q -f qcow2 {} 1M", q(img_)));
    must(fmt::format("qemu-io -c 'write -P 0x42 0 64k' {}", q(img_)));
  }
  // Opens and reads everything; returns the error message ("" if it worked).
  std::string open_error(bool read_only = true) {
    try {
      OpenOptions o;
      o.read_only = read_only;
      auto image = Image::open(img_, o);
      std::vector<uint8_t> buf(image->size());
      image->read(0, buf);
      return "";
    } catch (const Qcow2Error& e) {
      return e.what();
    }
  }
  TempDir dir_;
  std::string img_;
};

TEST_F(RobustnessTest, BaselineOpens) { EXPECT_EQ(open_error(), ""); }

TEST_F(RobustnessTest, TruncatedHeader) {
  ASSERT_EQ(::truncate(img_.c_str(), 40), 0);
  EXPECT_NE(open_error().find("too short"), std::string::npos);
}

TEST_F(RobustnessTest, BadMagic) {
  write_file_at(img_, 0, {'Q', 'F', 'I', 0});
  EXPECT_NE(open_error().find("magic"), std::string::npos);
}

TEST_F(RobustnessTest, BadVersion) {
  write_file_at(img_, 4, be32(9));
  EXPECT_NE(open_error().find("version"), std::string::npos);
}

TEST_F(RobustnessTest, BadClusterBits) {
  write_file_at(img_, 20, be32(40));
  EXPECT_NE(open_error().find("cluster size"), std::string::npos);
}

TEST_F(RobustnessTest, L1PastEndOfFile) {
  write_file_at(img_, 40, be64(0x7000000));
  EXPECT_NE(open_error().find("past the end"), std::string::npos);
}

TEST_F(RobustnessTest, L1OverlapsHeader) {
  write_file_at(img_, 40, be64(0));
  EXPECT_NE(open_error().find("overlaps the qcow2 header"), std::string::npos);
}

TEST_F(RobustnessTest, OversizedL1) {
  write_file_at(img_, 36, be32(0x40000000));
  EXPECT_NE(open_error().find("too large"), std::string::npos);
}

TEST_F(RobustnessTest, RefcountTablePastEnd) {
  write_file_at(img_, 48, be64(0x100000000ull));
  EXPECT_NE(open_error().find("refcount table"), std::string::npos);
}

TEST_F(RobustnessTest, OversizedRefcountTable) {
  write_file_at(img_, 56, be32(0x10000000));
  EXPECT_NE(open_error().find("refcount table is too large"), std::string::npos);
}

TEST_F(RobustnessTest, UnknownIncompatibleFeatureRefused) {
  write_file_at(img_, 72, be64(1ull << 40));
  EXPECT_NE(open_error().find("Unsupported"), std::string::npos);
}

TEST_F(RobustnessTest, ExtendedL2BitMakesL2EntriesSixteenBytes) {
  // The bit alone turns the second 8-byte entry into the first entry's subcluster bitmap: an
  // allocated + zero pair for subcluster 0 must be refused, not read.
  write_file_at(img_, 72, be64(kIncompatExtendedL2));
  write_file_at(img_, 0x40008, be64(0x0000000100000001ull));
  EXPECT_NE(open_error().find("subcluster both allocated and reading as zeros"), std::string::npos);
}

TEST_F(RobustnessTest, L2EntryPointingAtHeader) {
  write_file_at(img_, 0x40000, be64(kFlagCopied | 0));        // offset 0 = unallocated: harmless
  write_file_at(img_, 0x40008, be64(kFlagCopied | 0x10000));  // the refcount table
  EXPECT_NE(open_error().find("invalid host offset"), std::string::npos);
}

TEST_F(RobustnessTest, L1EntryPointingAtL1) {
  write_file_at(img_, 0x30000, be64(kFlagCopied | 0x30000));
  EXPECT_NE(open_error().find("invalid L2 table offset"), std::string::npos);
}

TEST_F(RobustnessTest, BackingNameOutsideHeaderCluster) {
  write_file_at(img_, 8, be64(0xfff0));
  write_file_at(img_, 16, be32(100));
  EXPECT_NE(open_error().find("backing file name"), std::string::npos);
}

TEST_F(RobustnessTest, GarbageCompressedClusterIsAnError) {
  write_file_at(img_, 0x40000, be64(kFlagCompressed | 0x50000));
  write_file_at(img_, 0x50000, std::vector<uint8_t>(512, 0xff));
  EXPECT_NE(open_error().find("decompress"), std::string::npos);
}

TEST_F(RobustnessTest, CorruptBitAllowsReadOnlyOnly) {
  write_file_at(img_, 72, be64(kIncompatCorrupt));
  EXPECT_EQ(open_error(true), "");
  EXPECT_NE(open_error(false).find("corrupt"), std::string::npos);
}

TEST_F(RobustnessTest, DeviceReportsEioForBadMetadata) {
  write_file_at(img_, 0x40000, be64(kFlagCopied | 0x20000));  // data "in" the refcount block
  auto dev = open_qcow2_device(img_, OpenOptions{});
  std::vector<uint8_t> buf(4096);
  iovec iov{buf.data(), buf.size()};
  std::promise<int> done;
  dev->read(0, std::span(&iov, 1), [&](int r) { done.set_value(r); });
  EXPECT_EQ(done.get_future().get(), -EIO);
}

TEST_F(RobustnessTest, LeakIsReportedAndRepaired) {
  // Refcount 1 for cluster 6 (0x60000), which nothing references.
  ASSERT_EQ(::truncate(img_.c_str(), 0x80000), 0);
  write_file_at(img_, 0x20000 + 6 * 2, {0, 1});
  EXPECT_EQ(run("qemu-img check " + q(img_)).status, 3);
  {
    auto image = Image::open(img_, OpenOptions{});
    auto r = image->check(RepairMode::kNone);
    EXPECT_EQ(r.leaks, 1u);
    EXPECT_EQ(r.corruptions, 0u);
  }
  {
    OpenOptions o;
    o.read_only = false;
    auto r = Image::open(img_, o)->check(RepairMode::kLeaks);
    EXPECT_EQ(r.leaks_fixed, 1u);
    EXPECT_EQ(r.leaks, 0u);
  }
  EXPECT_EQ(run("qemu-img check " + q(img_)).status, 0);
}

TEST_F(RobustnessTest, CorruptionIsReportedAndRepaired) {
  write_file_at(img_, 0x20000 + 5 * 2, {0, 0});  // data cluster 0x50000 refcount 0
  EXPECT_EQ(run("qemu-img check " + q(img_)).status, 2);
  {
    auto r = Image::open(img_, OpenOptions{})->check(RepairMode::kNone);
    EXPECT_GE(r.corruptions, 1u);
  }
  {
    OpenOptions o;
    o.read_only = false;
    auto r = Image::open(img_, o)->check(RepairMode::kAll);
    EXPECT_GE(r.corruptions_fixed, 1u);
    EXPECT_EQ(r.corruptions, 0u);
  }
  EXPECT_EQ(run("qemu-img check " + q(img_)).status, 0);
  const std::string raw = dir_ / "out.raw";
  must(fmt::format("qemu-img convert -O raw {} {}", q(img_), q(raw)));
  auto data = read_file(raw);
  EXPECT_EQ(data[0], 0x42);
  EXPECT_EQ(data[65535], 0x42);
}

TEST_F(RobustnessTest, LockingMatchesQemu) {
  OpenOptions rw;
  rw.read_only = false;
  auto writer = Image::open(img_, rw);
  EXPECT_THROW(Image::open(img_, rw), std::system_error);
  EXPECT_THROW(Image::open(img_, OpenOptions{}), std::system_error);
  OpenOptions shared;
  shared.force_share = true;
  EXPECT_NO_THROW(Image::open(img_, shared));
  // QEMU sees our locks and we see QEMU's.
  auto r = run("qemu-img info " + q(img_));
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.out.find("lock"), std::string::npos) << r.out;
  EXPECT_EQ(run("qemu-img info -U " + q(img_)).status, 0);
}

TEST(HeaderExtensions, UnknownExtensionSurvivesHeaderRewrite) {
  TempDir dir;
  const std::string img = dir / "x.qcow2";
  CreateOptions co;
  co.size = 64 << 20;
  co.cluster_size = 512;
  co.refcount_bits = 64;  // 64 clusters per block: the refcount table must grow
  co.backing_file = "";
  Image::create(img, co);
  {
    auto bytes = read_file(img);
    Header h = parse_header(bytes);
    h.extensions.push_back({0x12345678, {1, 2, 3, 4, 5}});
    auto out = serialize_header(h, 512);
    write_file_at(img, 0, out);
  }
  const uint64_t table_before = parse_header(read_file(img)).refcount_table_offset;
  {
    OpenOptions o;
    o.read_only = false;
    auto image = Image::open(img, o);
    std::vector<uint8_t> data(3 << 20, 0x5c);
    image->write(0, data);
    image->flush();
  }
  Header h = parse_header(read_file(img));
  EXPECT_NE(h.refcount_table_offset, table_before);  // the header really was rewritten
  ASSERT_EQ(h.extensions.size(), 1u);
  EXPECT_EQ(h.extensions[0].type, 0x12345678u);
  EXPECT_EQ(h.extensions[0].data, (std::vector<uint8_t>{1, 2, 3, 4, 5}));
  auto r = run("qemu-img check " + q(img));
  EXPECT_EQ(r.status, 0) << r.out;
}

TEST(Device, AsyncWritesFlushAndReads) {
  TempDir dir;
  const std::string img = dir / "d.qcow2";
  CreateOptions co;
  co.size = 8 << 20;
  Image::create(img, co);
  OpenOptions o;
  o.read_only = false;
  o.workers = 3;
  auto dev = open_qcow2_device(img, o);
  EXPECT_EQ(dev->size(), 8u << 20);
  std::atomic<int> errors{0}, completed{0};
  std::vector<std::vector<uint8_t>> bufs;
  for (int i = 0; i < 32; ++i) bufs.emplace_back(70000, uint8_t(i + 1));
  for (int i = 0; i < 32; ++i) {
    iovec iov[2] = {{bufs[i].data(), 30000}, {bufs[i].data() + 30000, 40000}};
    dev->write(uint64_t(i) * 200000, std::span(iov, 2), [&](int r) {
      errors += r != 0;
      ++completed;
    });
  }
  dev->drain();
  EXPECT_EQ(completed.load(), 32);
  std::promise<int> flushed;
  dev->flush([&](int r) { flushed.set_value(r); });
  EXPECT_EQ(flushed.get_future().get(), 0);
  dev->write_zeroes(200000, 70000, true, [&](int r) { errors += r != 0; });
  dev->drain();
  for (int i = 0; i < 32; ++i) {
    std::vector<uint8_t> got(70000);
    iovec iov{got.data(), got.size()};
    std::promise<int> done;
    dev->read(uint64_t(i) * 200000, std::span(&iov, 1), [&](int r) { done.set_value(r); });
    ASSERT_EQ(done.get_future().get(), 0);
    EXPECT_EQ(got, i == 1 ? std::vector<uint8_t>(70000, 0) : bufs[i]) << i;
  }
  EXPECT_EQ(errors.load(), 0);
  dev.reset();
  EXPECT_EQ(run("qemu-img check " + q(img)).status, 0);
}

TEST(Snapshots, WritesCopyOnWriteClustersSharedWithASnapshot) {
  testing::require_qemu_tools();
  TempDir dir;
  const std::string img = dir / "s.qcow2";
  must(fmt::format("qemu-img create -q -f qcow2 {} 4M", q(img)));
  must(fmt::format("qemu-io -c 'write -P 0x11 0 1M' {}", q(img)));
  must(fmt::format("qemu-img snapshot -c snap1 {}", q(img)));
  std::vector<uint8_t> expected(4 << 20, 0);
  std::fill(expected.begin(), expected.begin() + (1 << 20), 0x11);
  const std::vector<uint8_t> snapshot = expected;
  {
    OpenOptions o;
    o.read_only = false;
    auto image = Image::open(img, o);
    std::vector<uint8_t> data(100000, 0x22);
    image->write(30000, data);
    std::copy(data.begin(), data.end(), expected.begin() + 30000);
    image->write_zeroes(512 << 10, 128 << 10, true);
    std::fill(expected.begin() + (512 << 10), expected.begin() + (640 << 10), 0);
    image->flush();
  }
  auto r = run("qemu-img check " + q(img));
  EXPECT_EQ(r.status, 0) << r.out;
  must(fmt::format("qemu-img convert -O raw {} {}", q(img), q(dir / "cur.raw")));
  EXPECT_EQ(read_file(dir / "cur.raw"), expected);
  must(fmt::format("qemu-img convert -l snapshot.name=snap1 -O raw {} {}", q(img),
                   q(dir / "snap.raw")));
  EXPECT_EQ(read_file(dir / "snap.raw"), snapshot);
  // kiln's own check counts the snapshot's references too.
  auto kr = Image::open(img, OpenOptions{})->check(RepairMode::kNone);
  EXPECT_EQ(kr.corruptions + kr.leaks, 0u);
}

TEST_F(RobustnessTest, DirtyImageIsRepairedWhenOpenedForWriting) {
  ASSERT_EQ(::truncate(img_.c_str(), 0x80000), 0);
  write_file_at(img_, 0x20000 + 6 * 2, {0, 1});  // leak, as a lazy-refcounts crash leaves
  write_file_at(img_, 72, be64(kIncompatDirty));
  write_file_at(img_, 80, be64(kCompatLazyRefcounts));
  OpenOptions o;
  o.read_only = false;
  {
    auto image = Image::open(img_, o);
    EXPECT_EQ(image->header().incompatible_features & kIncompatDirty, 0u);
  }
  EXPECT_EQ(parse_header(read_file(img_)).incompatible_features & kIncompatDirty, 0u);
  EXPECT_EQ(run("qemu-img check " + q(img_)).status, 0);
}

TEST(ReadOnly, WritesAreRefused) {
  TempDir dir;
  const std::string img = dir / "ro.qcow2";
  CreateOptions co;
  co.size = 1 << 20;
  Image::create(img, co);
  auto dev = open_qcow2_device(img, OpenOptions{});
  std::vector<uint8_t> buf(512);
  iovec iov{buf.data(), buf.size()};
  std::promise<int> done;
  dev->write(0, std::span(&iov, 1), [&](int r) { done.set_value(r); });
  EXPECT_EQ(done.get_future().get(), -EROFS);
}

}  // namespace
}  // namespace kiln::block::qcow2
