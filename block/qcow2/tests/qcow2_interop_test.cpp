// Interop with QEMU both ways: images QEMU makes read identically through kiln, images kiln
// makes pass qemu-img check and read identically through QEMU.
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

constexpr uint64_t kSize = 16ull << 20;

struct Format {
  uint32_t cluster_size;
  uint32_t refcount_bits;
  std::string compat;
};

std::string name_of(const ::testing::TestParamInfo<Format>& info) {
  return fmt::format("c{}_r{}_v{}", info.param.cluster_size, info.param.refcount_bits,
                     info.param.compat == "1.1" ? 3 : 2);
}

std::vector<uint8_t> read_all(SyncImage& img) {
  std::vector<uint8_t> out(img.size());
  img.read(0, out);
  return out;
}

std::vector<uint8_t> qemu_raw(const TempDir& dir, const std::string& image) {
  const std::string raw = dir / "oracle.raw";
  must(fmt::format("qemu-img convert -O raw {} {}", q(image), q(raw)));
  return read_file(raw);
}

class InteropTest : public ::testing::TestWithParam<Format> {
 protected:
  void SetUp() override { testing::require_qemu_tools(); }
  std::string create_opts() const {
    return fmt::format("cluster_size={},refcount_bits={},compat={}", GetParam().cluster_size,
                       GetParam().refcount_bits, GetParam().compat);
  }
  TempDir dir_;
};

TEST_P(InteropTest, QemuWrittenImageReadsIdentically) {
  const std::string img = dir_ / "q.qcow2";
  must(fmt::format("qemu-img create -q -f qcow2 -o {} {} {}", create_opts(), q(img), kSize));
  must(
      fmt::format("qemu-io -c 'write -P 0x11 0 1k' -c 'write -P 0x22 3000 70k' "
                  "-c 'write -P 0x33 5M 2M' -c 'write -P 0x44 {} 4k' -c 'write -z 5500k 600k' "
                  "-c 'discard 6M 128k' {}",
                  kSize - 4096, q(img)));
  OpenOptions o;
  auto image = Image::open(img, o);
  EXPECT_EQ(read_all(*image), qemu_raw(dir_, img));
  EXPECT_EQ(image->check(RepairMode::kNone).corruptions, 0u);
}

TEST_P(InteropTest, KilnWrittenImagePassesQemuCheckAndReadsIdentically) {
  const std::string img = dir_ / "k.qcow2";
  CreateOptions co;
  co.size = kSize;
  co.cluster_size = GetParam().cluster_size;
  co.refcount_bits = GetParam().refcount_bits;
  co.version = GetParam().compat == "1.1" ? 3 : 2;
  Image::create(img, co);
  std::vector<uint8_t> model(kSize, 0);
  {
    OpenOptions o;
    o.read_only = false;
    o.l2_cache_bytes = 64 * co.cluster_size;  // small cache: exercises eviction ordering
    o.unsafe = true;  // format correctness here; durability is the crash test's job
    auto image = Image::open(img, o);
    std::mt19937_64 rng(co.cluster_size * 131 + co.refcount_bits);
    for (int i = 0; i < 60; ++i) {
      const uint64_t len = 1 + rng() % (200 << 10);
      const uint64_t off = rng() % (kSize - len);
      std::vector<uint8_t> data(len, uint8_t(i + 1));
      image->write(off, data);
      std::copy(data.begin(), data.end(), model.begin() + off);
      if (i % 17 == 5) {
        const uint64_t zlen = rng() % (1 << 20), zoff = rng() % (kSize - zlen);
        image->write_zeroes(zoff, zlen, i % 2);
        std::fill(model.begin() + zoff, model.begin() + zoff + zlen, 0);
      }
      if (i % 23 == 7) {
        // Discard gives back whole clusters only; those read as zeros afterwards (no backing).
        const uint64_t dlen = rng() % (1 << 20), doff = rng() % (kSize - dlen);
        image->discard(doff, dlen);
        const uint64_t cs = co.cluster_size;
        const uint64_t first = (doff + cs - 1) / cs * cs, last = (doff + dlen) / cs * cs;
        if (last > first) std::fill(model.begin() + first, model.begin() + last, 0);
      }
      if (i % 10 == 0) image->flush();
    }
    EXPECT_EQ(read_all(*image), model);
    image->flush();
  }
  auto r = run("qemu-img check " + q(img));
  EXPECT_EQ(r.status, 0) << r.out;
  EXPECT_EQ(qemu_raw(dir_, img), model);
}

INSTANTIATE_TEST_SUITE_P(Matrix, InteropTest,
                         ::testing::Values(Format{512, 1, "1.1"}, Format{512, 16, "1.1"},
                                           Format{512, 64, "1.1"}, Format{65536, 1, "1.1"},
                                           Format{65536, 16, "1.1"}, Format{65536, 64, "1.1"},
                                           Format{2u << 20, 1, "1.1"}, Format{2u << 20, 16, "1.1"},
                                           Format{2u << 20, 64, "1.1"}, Format{512, 16, "0.10"},
                                           Format{65536, 16, "0.10"}, Format{2u << 20, 16, "0.10"}),
                         name_of);

class ChainTest : public ::testing::Test {
 protected:
  void SetUp() override { testing::require_qemu_tools(); }
  TempDir dir_;
};

// raw base <- qcow2 (512 B clusters) <- qcow2 (2 MiB, v2) <- qcow2 top: depth 3 below the top.
TEST_F(ChainTest, DepthThreeChainReadsAndWritesLikeQemu) {
  const std::string base = dir_ / "base.raw", m1 = dir_ / "m1.qcow2", m2 = dir_ / "m2.qcow2",
                    top = dir_ / "top.qcow2";
  must(fmt::format("qemu-img create -q -f raw {} 8M", q(base)));
  must(fmt::format("qemu-io -f raw -c 'write -P 0xa1 0 8M' {}", q(base)));
  must(fmt::format("qemu-img create -q -f qcow2 -o cluster_size=512 -b base.raw -F raw {}", q(m1)));
  must(fmt::format("qemu-io -c 'write -P 0xb2 1M 1M' -c 'write -z 3M 100k' {}", q(m1)));
  must(
      fmt::format("qemu-img create -q -f qcow2 -o cluster_size=2M,compat=0.10 -b m1.qcow2 -F "
                  "qcow2 {}",
                  q(m2)));
  must(fmt::format("qemu-io -c 'write -P 0xc3 1500k 300k' {}", q(m2)));
  must(fmt::format("qemu-img create -q -f qcow2 -b m2.qcow2 -F qcow2 {} 12M", q(top)));
  must(fmt::format("qemu-io -c 'write -P 0xd4 7M 1k' {}", q(top)));

  std::vector<uint8_t> expected = qemu_raw(dir_, top);
  {
    auto image = Image::open(top, OpenOptions{});
    ASSERT_EQ(image->size(), 12u << 20);
    EXPECT_EQ(read_all(*image), expected);
  }
  // Partial writes copy the rest of each cluster up from the chain.
  {
    OpenOptions o;
    o.read_only = false;
    auto image = Image::open(top, o);
    std::vector<uint8_t> data(1000, 0xe5);
    image->write(1500000, data);
    image->write(9000000, data);  // beyond the backing file's end: rest of cluster is zeros
    std::copy(data.begin(), data.end(), expected.begin() + 1500000);
    std::copy(data.begin(), data.end(), expected.begin() + 9000000);
    image->write_zeroes(0, 64 << 10, true);  // v3 with a backing file: a zero cluster
    std::fill(expected.begin(), expected.begin() + (64 << 10), 0);
    image->flush();
  }
  EXPECT_EQ(run("qemu-img check " + q(top)).status, 0);
  EXPECT_EQ(qemu_raw(dir_, top), expected);
}

TEST_F(ChainTest, BackingLoopIsRefused) {
  const std::string a = dir_ / "a.qcow2", b = dir_ / "b.qcow2";
  must(fmt::format("qemu-img create -q -f qcow2 {} 1M", q(b)));
  must(fmt::format("qemu-img create -q -f qcow2 -b b.qcow2 -F qcow2 {}", q(a)));
  must(fmt::format("qemu-img rebase -u -b a.qcow2 -F qcow2 {}", q(b)));
  try {
    Image::open(a, OpenOptions{});
    FAIL() << "loop accepted";
  } catch (const Qcow2Error& e) {
    EXPECT_NE(std::string(e.what()).find("loop"), std::string::npos) << e.what();
  }
}

class CompressedTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override { testing::require_qemu_tools(); }
  TempDir dir_;
};

TEST_P(CompressedTest, QemuCompressedClustersReadRight) {
  const std::string raw = dir_ / "src.raw", img = dir_ / "c.qcow2";
  must(fmt::format("qemu-img create -q -f raw {} 4M", q(raw)));
  must(
      fmt::format("qemu-io -f raw -c 'write -P 0x5a 0 300k' -c 'write -P 0x11 1M 64k' "
                  "-c 'write -P 0x77 3000k 5k' {}",
                  q(raw)));
  // Incompressible data too, so some clusters stay uncompressed.
  must(
      fmt::format("head -c 200000 /dev/urandom | dd of={} bs=1000 seek=2000 conv=notrunc "
                  "iflag=fullblock status=none",
                  q(raw)));
  must(fmt::format("qemu-img convert -c -O qcow2 -o compression_type={} {} {}", GetParam(), q(raw),
                   q(img)));
  auto image = Image::open(img, OpenOptions{});
  EXPECT_EQ(read_all(*image), read_file(raw));
  auto r = image->check(RepairMode::kNone);
  EXPECT_GT(r.compressed_clusters, 0u);
  EXPECT_EQ(r.corruptions + r.leaks, 0u);
}

TEST_P(CompressedTest, KilnCompressedClustersPassQemu) {
  const std::string img = dir_ / "k.qcow2";
  CreateOptions co;
  co.size = 4 << 20;
  co.compression_type = GetParam() == "zstd" ? CompressionType::kZstd : CompressionType::kZlib;
  Image::create(img, co);
  std::vector<uint8_t> model(co.size, 0);
  {
    OpenOptions o;
    o.read_only = false;
    auto image = Image::open(img, o);
    for (uint64_t c = 0; c < 40; ++c) {
      std::vector<uint8_t> cluster(65536);
      for (size_t i = 0; i < cluster.size(); ++i) cluster[i] = uint8_t((i / (c + 1)) ^ c);
      image->write_compressed(c * 65536, cluster);
      std::copy(cluster.begin(), cluster.end(), model.begin() + c * 65536);
    }
    // Overwriting part of a compressed cluster decompresses it into a normal one.
    std::vector<uint8_t> patch(100, 0xee);
    image->write(3 * 65536 + 10, patch);
    std::copy(patch.begin(), patch.end(), model.begin() + 3 * 65536 + 10);
    EXPECT_EQ(read_all(*image), model);
  }
  auto r = run("qemu-img check " + q(img));
  EXPECT_EQ(r.status, 0) << r.out;
  EXPECT_NE(r.out.find("compressed clusters"), std::string::npos);
  EXPECT_EQ(qemu_raw(dir_, img), model);
}

INSTANTIATE_TEST_SUITE_P(Types, CompressedTest, ::testing::Values("zlib", "zstd"));

}  // namespace
}  // namespace kiln::block::qcow2
