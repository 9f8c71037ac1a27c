// Extended L2 entries (subclusters): images QEMU writes read identically through kiln, images
// kiln writes pass qemu-img check and read identically through QEMU, partial writes allocate only
// the subclusters they touch, and malformed subcluster bitmaps give errors, never crashes.
#include <fmt/format.h>

#include <random>

#include "block/qcow2/qcow2.h"
#include "block/qcow2/tests/test_util.h"

namespace kiln::block::qcow2 {
namespace {

using testing::must;
using testing::q;
using testing::read_file;
using testing::run;
using testing::TempDir;
using testing::write_file_at;

std::vector<uint8_t> read_all(SyncImage& img) {
  std::vector<uint8_t> out(img.size());
  img.read(0, out);
  return out;
}

std::vector<uint8_t> be64(uint64_t v) {
  std::vector<uint8_t> b(8);
  store_be64(b.data(), v);
  return b;
}

struct Layout {
  uint32_t cluster_size;
  bool backing;
};

std::string name_of(const ::testing::TestParamInfo<Layout>& info) {
  return fmt::format("c{}_{}", info.param.cluster_size,
                     info.param.backing ? "backing" : "standalone");
}

class ExtendedL2Test : public ::testing::TestWithParam<Layout> {
 protected:
  void SetUp() override {
    testing::require_qemu_tools();
    cs_ = GetParam().cluster_size;
    sc_ = cs_ / 32;
    size_ = std::max<uint64_t>(8ull << 20, 8 * cs_);
    if (GetParam().backing) {
      // A backing file whose every sector differs, so reading the wrong place shows.
      must(fmt::format("qemu-img create -q -f raw {} {}", q(base_), size_));
      std::vector<uint8_t> pattern(size_);
      for (size_t i = 0; i < pattern.size(); ++i) pattern[i] = uint8_t(i / 512 * 7 + 1);
      write_file_at(base_, 0, pattern);
    }
  }
  std::string backing_opts() const { return GetParam().backing ? " -b base.raw -F raw" : ""; }
  std::vector<uint8_t> qemu_raw(const std::string& image) {
    const std::string raw = dir_ / "oracle.raw";
    must(fmt::format("qemu-img convert -O raw {} {}", q(image), q(raw)));
    return read_file(raw);
  }
  std::vector<uint8_t> base_bytes() {
    return GetParam().backing ? read_file(base_) : std::vector<uint8_t>(size_, 0);
  }

  TempDir dir_;
  std::string base_ = dir_ / "base.raw";
  uint64_t cs_ = 0, sc_ = 0, size_ = 0;
};

TEST_P(ExtendedL2Test, QemuWrittenImageReadsIdentically) {
  const std::string img = dir_ / "q.qcow2";
  must(fmt::format("qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size={}{} {} {}", cs_,
                   backing_opts(), q(img), size_));
  // Sub-cluster writes at subcluster and sector offsets, zeroes and discards of all kinds.
  must(fmt::format(
      "qemu-io -c 'write -P 0x11 {} {}' -c 'write -P 0x22 {} 1k' -c 'write -P 0x33 {} {}' "
      "-c 'write -z {} {}' -c 'write -z {} 512' -c 'write -P 0x44 {} {}' -c 'discard {} {}' "
      "-c 'write -z -u {} {}' -c 'write -P 0x55 {} 3000' {}",
      sc_, sc_, cs_ + 3 * sc_ + 512, 2 * cs_ + sc_, 3 * sc_ + 100, 3 * cs_ + 2 * sc_, 4 * sc_,
      3 * cs_ + 9 * sc_ + 512, 4 * cs_, 2 * cs_, 4 * cs_, cs_, 5 * cs_, cs_, size_ - 3000, q(img)));
  auto image = Image::open(img, OpenOptions{});
  EXPECT_TRUE(image->extended_l2());
  EXPECT_EQ(read_all(*image), qemu_raw(img));
  const auto r = image->check(RepairMode::kNone);
  EXPECT_EQ(r.corruptions + r.leaks + r.check_errors, 0u);
  // The first subcluster of cluster 0 was never written: unallocated in an allocated cluster.
  const Extent e = image->block_status(0, sc_);
  EXPECT_EQ(e.kind, ExtentKind::kUnallocated);
  EXPECT_NE(e.host_offset, 0u);
  EXPECT_EQ(image->block_status(sc_, cs_).kind, ExtentKind::kData);
  EXPECT_EQ(image->block_status(sc_, cs_).length, sc_);
}

TEST_P(ExtendedL2Test, KilnWrittenImagePassesQemuCheckAndReadsIdentically) {
  const std::string img = dir_ / "k.qcow2";
  CreateOptions co;
  co.size = size_;
  co.cluster_size = cs_;
  co.extended_l2 = true;
  if (GetParam().backing) {
    co.backing_file = "base.raw";
    co.backing_format = "raw";
  }
  Image::create(img, co);
  std::vector<uint8_t> model = base_bytes();
  {
    OpenOptions o;
    o.read_only = false;
    o.l2_cache_bytes = 4 * cs_;  // small cache: 16-byte entries go through eviction too
    o.unsafe = true;
    auto image = Image::open(img, o);
    std::mt19937_64 rng(cs_ + GetParam().backing);
    for (int i = 0; i < 80; ++i) {
      // Mostly small writes (a few subclusters), some spanning clusters.
      const uint64_t len = 1 + rng() % (i % 4 == 0 ? 3 * cs_ : 3 * sc_);
      const uint64_t off = rng() % (size_ - len);
      std::vector<uint8_t> data(len, uint8_t(i + 1));
      image->write(off, data);
      std::copy(data.begin(), data.end(), model.begin() + off);
      if (i % 9 == 4) {
        const uint64_t zlen = rng() % (2 * cs_), zoff = rng() % (size_ - zlen);
        image->write_zeroes(zoff, zlen, i % 2);
        std::fill(model.begin() + zoff, model.begin() + zoff + zlen, 0);
      }
      if (i % 13 == 6) {
        // Whole clusters only; with extended L2 they read as zeros afterwards, as in QEMU.
        const uint64_t dlen = rng() % (3 * cs_), doff = rng() % (size_ - dlen);
        image->discard(doff, dlen);
        const uint64_t first = (doff + cs_ - 1) / cs_ * cs_, last = (doff + dlen) / cs_ * cs_;
        if (last > first) std::fill(model.begin() + first, model.begin() + last, 0);
      }
      if (i % 10 == 0) image->flush();
    }
    EXPECT_EQ(read_all(*image), model);
    image->flush();
  }
  auto r = run("qemu-img check " + q(img));
  EXPECT_EQ(r.status, 0) << r.out;
  EXPECT_EQ(qemu_raw(img), model);
  const std::string model_raw = dir_ / "model.raw";
  must(fmt::format("truncate -s {} {}", size_, q(model_raw)));
  write_file_at(model_raw, 0, model);
  EXPECT_NE(must(fmt::format("qemu-img compare -f qcow2 -F raw {} {}", q(img), q(model_raw)))
                .find("Images are identical"),
            std::string::npos);
  auto image = Image::open(img, OpenOptions{});
  const auto kr = image->check(RepairMode::kNone);
  EXPECT_EQ(kr.corruptions + kr.leaks, 0u);
}

// The point of subclusters: a small write into a new cluster writes that subcluster only and
// leaves the rest unallocated, reading through to the backing file (or as zeros).
TEST_P(ExtendedL2Test, PartialWriteAllocatesOnlyTouchedSubclusters) {
  const std::string img = dir_ / "p.qcow2";
  CreateOptions co;
  co.size = size_;
  co.cluster_size = cs_;
  co.extended_l2 = true;
  if (GetParam().backing) {
    co.backing_file = "base.raw";
    co.backing_format = "raw";
  }
  Image::create(img, co);
  const uint64_t off = 2 * cs_ + 5 * sc_ + 100;  // inside subcluster 5 of cluster 2
  std::vector<uint8_t> data(sc_, 0x5a);          // spills into subcluster 6
  {
    OpenOptions o;
    o.read_only = false;
    auto image = Image::open(img, o);
    image->write(off, data);
    image->flush();
    const Extent before = image->block_status(2 * cs_, cs_);
    EXPECT_EQ(before.kind, ExtentKind::kUnallocated);
    EXPECT_EQ(before.length, 5 * sc_);
    const Extent written = image->block_status(2 * cs_ + 5 * sc_, cs_);
    EXPECT_EQ(written.kind, ExtentKind::kData);
    EXPECT_EQ(written.length, 2 * sc_);
  }
  // QEMU sees the same: two data subclusters, the rest from the layer below.
  const std::string map = must(fmt::format("qemu-img map --output=json {}", q(img)));
  EXPECT_NE(map.find(fmt::format("\"start\": {}, \"length\": {}, \"depth\": 0, \"present\": true, "
                                 "\"zero\": false, \"data\": true",
                                 2 * cs_ + 5 * sc_, 2 * sc_)),
            std::string::npos)
      << map;
  EXPECT_EQ(run("qemu-img check " + q(img)).status, 0);

  std::vector<uint8_t> expected = base_bytes();
  std::copy(data.begin(), data.end(), expected.begin() + off);
  EXPECT_EQ(qemu_raw(img), expected);
  if (GetParam().backing) {
    // Nothing of cluster 2 was copied up: new backing data shows through the untouched
    // subclusters (and the COW'd head of subcluster 5 keeps the old backing bytes).
    must(fmt::format("qemu-io -f raw -c 'write -P 0xee {} {}' {}", 2 * cs_, cs_, q(base_)));
    auto image = Image::open(img, OpenOptions{});
    std::vector<uint8_t> cluster(cs_);
    image->read(2 * cs_, cluster);
    for (uint64_t i = 0; i < cs_; ++i) {
      const uint64_t g = 2 * cs_ + i;
      const uint8_t want = g >= off && g < off + sc_       ? 0x5a
                           : (i >= 5 * sc_ && i < 7 * sc_) ? expected[g]
                                                           : 0xee;
      ASSERT_EQ(cluster[i], want) << "byte " << i;
    }
  }
}

TEST_P(ExtendedL2Test, ZeroesAndCompressedClustersInteroperate) {
  const std::string img = dir_ / "z.qcow2";
  must(fmt::format("qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size={}{} {} {}", cs_,
                   backing_opts(), q(img), size_));
  must(fmt::format("qemu-io -c 'write -P 0x61 0 {}' -c 'write -c -P 0x62 {} {}' {}", 2 * cs_,
                   2 * cs_, cs_, q(img)));
  std::vector<uint8_t> model = qemu_raw(img);
  {
    OpenOptions o;
    o.read_only = false;
    auto image = Image::open(img, o);
    // Whole subclusters get zero bits, partial ones explicit zeros, on data and unallocated.
    image->write_zeroes(sc_ + 10, 3 * sc_, false);
    image->write_zeroes(cs_, cs_, false);  // whole cluster, host kept
    image->write_zeroes(4 * cs_ + 2 * sc_, 2 * sc_, true);
    // Partly overwriting a compressed cluster makes it a normal one with all subclusters.
    std::vector<uint8_t> patch(700, 0x63);
    image->write(2 * cs_ + 3 * sc_, patch);
    // A compressed write into an unallocated cluster.
    std::vector<uint8_t> cluster(cs_, 0x64);
    image->write_compressed(6 * cs_, cluster);
    std::fill(model.begin() + sc_ + 10, model.begin() + 4 * sc_ + 10, 0);
    std::fill(model.begin() + cs_, model.begin() + 2 * cs_, 0);
    std::fill(model.begin() + 4 * cs_ + 2 * sc_, model.begin() + 4 * cs_ + 4 * sc_, 0);
    std::copy(patch.begin(), patch.end(), model.begin() + 2 * cs_ + 3 * sc_);
    std::copy(cluster.begin(), cluster.end(), model.begin() + 6 * cs_);
    EXPECT_EQ(read_all(*image), model);
    EXPECT_EQ(image->block_status(cs_, cs_).kind, ExtentKind::kZero);
    EXPECT_NE(image->block_status(cs_, cs_).host_offset, 0u);  // preallocated zeros
    EXPECT_EQ(image->block_status(6 * cs_, cs_).kind, ExtentKind::kCompressed);
  }
  auto r = run("qemu-img check " + q(img));
  EXPECT_EQ(r.status, 0) << r.out;
  EXPECT_NE(r.out.find("compressed clusters"), std::string::npos);
  EXPECT_EQ(qemu_raw(img), model);
}

TEST_P(ExtendedL2Test, SnapshotsKeepSubclusterState) {
  const std::string img = dir_ / "s.qcow2";
  must(fmt::format("qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size={}{} {} {}", cs_,
                   backing_opts(), q(img), size_));
  must(fmt::format("qemu-io -c 'write -P 0x71 {} {}' -c 'write -z {} {}' {}", sc_, sc_, 3 * sc_,
                   sc_, q(img)));
  const std::vector<uint8_t> at_snapshot = qemu_raw(img);
  std::vector<uint8_t> later = at_snapshot;
  {
    OpenOptions o;
    o.read_only = false;
    auto image = Image::open(img, o);
    image->create_snapshot("s1");
    // The cluster is shared now: the write moves it with its allocated subclusters only.
    std::vector<uint8_t> data(100, 0x72);
    image->write(5 * sc_, data);
    std::copy(data.begin(), data.end(), later.begin() + 5 * sc_);
    EXPECT_EQ(read_all(*image), later);
    image->flush();
  }
  EXPECT_EQ(run("qemu-img check " + q(img)).status, 0);
  EXPECT_EQ(qemu_raw(img), later);
  must(fmt::format("qemu-img convert -l snapshot.name=s1 -O raw {} {}", q(img),
                   q(dir_ / "snap.raw")));
  EXPECT_EQ(read_file(dir_ / "snap.raw"), at_snapshot);
  {
    OpenOptions o;
    o.read_only = false;
    auto image = Image::open(img, o);
    image->apply_snapshot("s1");
    EXPECT_EQ(read_all(*image), at_snapshot);
    EXPECT_EQ(image->block_status(0, sc_).kind, ExtentKind::kUnallocated);
  }
  EXPECT_EQ(run("qemu-img check " + q(img)).status, 0);
  EXPECT_EQ(qemu_raw(img), at_snapshot);
}

INSTANTIATE_TEST_SUITE_P(Layouts, ExtendedL2Test,
                         ::testing::Values(Layout{65536, false}, Layout{65536, true},
                                           Layout{2u << 20, false}, Layout{2u << 20, true},
                                           Layout{16384, true}),
                         name_of);

// Malformed extended L2 entries. Layout of the QEMU-made image (64 KiB clusters): L2 table at
// 0x40000, 16 bytes per entry; cluster 0 data, cluster 1 compressed, cluster 2 data.
class ExtendedL2BadInputTest : public ::testing::Test {
 protected:
  void SetUp() override {
    testing::require_qemu_tools();
    must(fmt::format("qemu-img create -q -f qcow2 -o extended_l2=on {} 1M", q(img_)));
    must(fmt::format(
        "qemu-io -c 'write -P 1 0 4k' -c 'write -c -P 2 64k 64k' -c 'write -P 3 128k 64k' {}",
        q(img_)));
    ASSERT_EQ(load_be64(read_file(img_).data() + 0x40008), 3u) << "unexpected layout";
  }
  void set_bitmap(uint64_t l2_index, uint64_t bitmap) {
    write_file_at(img_, 0x40000 + l2_index * 16 + 8, be64(bitmap));
  }
  std::string read_error(uint64_t offset) {
    try {
      auto image = Image::open(img_, OpenOptions{});
      std::vector<uint8_t> buf(4096);
      image->read(offset, buf);
      image->block_status(offset, 4096);
      return "";
    } catch (const Qcow2Error& e) {
      return e.what();
    }
  }
  CheckResult kiln_check() { return Image::open(img_, OpenOptions{})->check(RepairMode::kNone); }
  static bool has_message(const CheckResult& r, const std::string& text) {
    for (const auto& m : r.messages) {
      if (m.find(text) != std::string::npos) return true;
    }
    return false;
  }
  TempDir dir_;
  std::string img_ = dir_ / "bad.qcow2";
};

TEST_F(ExtendedL2BadInputTest, SubclusterBothAllocatedAndZero) {
  set_bitmap(0, 0x0000000100000001ull);
  EXPECT_NE(read_error(0).find("subcluster both allocated and reading as zeros"),
            std::string::npos);
  const auto r = kiln_check();
  EXPECT_EQ(r.corruptions, 1u);
  EXPECT_TRUE(has_message(
      r, "ERROR offset=50000: Allocated cluster has corrupted subcluster allocation bitmap"));
  // QEMU agrees it is corrupt.
  EXPECT_EQ(run("qemu-img check " + q(img_)).status, 2);
  // Writing into it is refused too, and changes nothing.
  OpenOptions o;
  o.read_only = false;
  auto image = Image::open(img_, o);
  std::vector<uint8_t> data(10, 9);
  EXPECT_THROW(image->write(100, data), Qcow2Error);
}

TEST_F(ExtendedL2BadInputTest, CompressedClusterWithBitmap) {
  set_bitmap(1, 5);
  // Reads as QEMU reads it (the bitmap is reserved), but check reports it.
  EXPECT_EQ(read_error(64 << 10), "");
  const auto r = kiln_check();
  EXPECT_EQ(r.corruptions, 1u);
  EXPECT_TRUE(has_message(r,
                          "ERROR compressed cluster 1 with non-zero subcluster allocation "
                          "bitmap, entry=0x4000000000060000"));
  EXPECT_EQ(run("qemu-img check " + q(img_)).status, 2);
}

TEST_F(ExtendedL2BadInputTest, UnallocatedClusterWithAllocatedSubclusters) {
  set_bitmap(3, 3);
  EXPECT_NE(read_error(192 << 10).find("unallocated cluster with allocated subclusters"),
            std::string::npos);
  const auto r = kiln_check();
  EXPECT_EQ(r.corruptions, 1u);
  EXPECT_TRUE(has_message(r, "ERROR: Unallocated cluster has non-zero subcluster allocation map"));
  EXPECT_EQ(run("qemu-img check " + q(img_)).status, 2);
}

TEST(ExtendedL2Create, ClusterSizeAndCompatRulesMatchQemu) {
  TempDir dir;
  CreateOptions co;
  co.size = 1 << 20;
  co.extended_l2 = true;
  co.cluster_size = 8192;
  try {
    Image::create(dir / "a.qcow2", co);
    FAIL() << "8 KiB clusters accepted with extended L2";
  } catch (const Qcow2Error& e) {
    EXPECT_STREQ(e.what(),
                 "Extended L2 entries are only supported with cluster sizes of at least 16384 "
                 "bytes");
  }
  co.cluster_size = 16384;
  co.version = 2;
  EXPECT_THROW(Image::create(dir / "a.qcow2", co), Qcow2Error);
}

TEST(ExtendedL2Open, TooSmallClusterSizeIsRefused) {
  testing::require_qemu_tools();
  TempDir dir;
  const std::string img = dir / "e.qcow2";
  must(fmt::format("qemu-img create -q -f qcow2 -o cluster_size=8k {} 1M", q(img)));
  // Set incompatible feature bit 4 (byte 79 of the header) by hand.
  write_file_at(img, 79, {0x10});
  try {
    Image::open(img, OpenOptions{});
    FAIL() << "opened";
  } catch (const Qcow2Error& e) {
    EXPECT_STREQ(e.what(), "Unsupported subcluster size: 256");
  }
  EXPECT_NE(run("qemu-img info " + q(img)).out.find("Unsupported subcluster size: 256"),
            std::string::npos);
}

}  // namespace
}  // namespace kiln::block::qcow2
