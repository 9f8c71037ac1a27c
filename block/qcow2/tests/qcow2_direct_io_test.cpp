// cache=none: qcow2 files open with O_DIRECT, and the small, unaligned metadata and compressed
// writes go through aligned bounce buffers. Files written this way must be byte-identical to the
// same operations done through the page cache, and pass qemu-img check.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <random>
#include <system_error>

#include "block/qcow2/file_io.h"
#include "block/qcow2/qcow2.h"
#include "block/qcow2/tests/test_util.h"

namespace kiln::block::qcow2::testing {
namespace {

// True when this process holds `path` open with O_DIRECT (the flags in /proc/self/fdinfo).
bool open_with_o_direct(const std::string& path) {
  const auto target = std::filesystem::canonical(path);
  for (const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) {
    std::error_code ec;
    if (std::filesystem::read_symlink(entry.path(), ec) != target) continue;
    std::ifstream info("/proc/self/fdinfo/" + entry.path().filename().string());
    std::string key;
    std::string flags;
    while (info >> key >> flags) {
      if (key == "flags:" && (std::stoul(flags, nullptr, 8) & O_DIRECT)) return true;
    }
  }
  return false;
}

std::vector<uint8_t> random_bytes(std::mt19937& rng, size_t n) {
  std::vector<uint8_t> out(n);
  for (auto& b : out) b = uint8_t(rng());
  return out;
}

class FileIoDirectTest : public ::testing::Test {
 protected:
  void SetUp() override {
    // A size that is not a multiple of any block: the tail block is partial.
    model_ = random_bytes(rng_, 3 * 4096 + 100);
    std::ofstream(dir_ / "f", std::ios::binary)
        .write(reinterpret_cast<const char*>(model_.data()), std::streamsize(model_.size()));
    fd_ = ::open((dir_ / "f").c_str(), O_RDWR | O_DIRECT | O_CLOEXEC);
    ASSERT_GE(fd_, 0) << "O_DIRECT open failed: " << std::strerror(errno);
  }
  void TearDown() override { ::close(fd_); }

  void write(uint64_t offset, const std::vector<uint8_t>& bytes) {
    pwrite_all(fd_, bytes, offset);
    if (offset + bytes.size() > model_.size()) model_.resize(offset + bytes.size());
    std::copy(bytes.begin(), bytes.end(), model_.begin() + long(offset));
  }

  std::mt19937 rng_{42};
  TempDir dir_;
  std::vector<uint8_t> model_;
  int fd_ = -1;
};

TEST_F(FileIoDirectTest, UnalignedReadsSeeTheFile) {
  for (auto [offset, length] : std::vector<std::pair<uint64_t, size_t>>{
           {0, 1}, {1, 4096}, {4095, 2}, {511, 8192}, {4096, 4096}, {12200, 100}}) {
    std::vector<uint8_t> got(length);
    pread_exact(fd_, got, offset, "test range");
    EXPECT_TRUE(std::equal(got.begin(), got.end(), model_.begin() + long(offset)))
        << offset << "+" << length;
  }
  // Past the end: zeros for pread_zero_fill, an error for pread_exact.
  std::vector<uint8_t> tail(300, 0xff);
  pread_zero_fill(fd_, tail, model_.size() - 50);
  EXPECT_TRUE(std::equal(tail.begin(), tail.begin() + 50, model_.end() - 50));
  EXPECT_TRUE(std::all_of(tail.begin() + 50, tail.end(), [](uint8_t b) { return b == 0; }));
  EXPECT_THROW(pread_exact(fd_, tail, model_.size() - 50, "tail"), Qcow2Error);
}

TEST_F(FileIoDirectTest, UnalignedWritesKeepTheirNeighboursAndTheFileSize) {
  write(3, random_bytes(rng_, 8));                    // inside the first block
  write(4090, random_bytes(rng_, 20));                // across a block boundary
  write(8192, random_bytes(rng_, 4096));              // aligned offset and length, unaligned memory
  write(model_.size() - 10, random_bytes(rng_, 30));  // across the end of the file
  write(model_.size() + 5000, random_bytes(rng_, 7));  // past the end, leaving a gap
  // More than one bounce step (1 MiB), from an odd offset.
  write(777, random_bytes(rng_, (2 << 20) + 333));
  EXPECT_EQ(fd_size(fd_), model_.size()) << "padding past the end must be cut off again";
  EXPECT_EQ(read_file(dir_ / "f"), model_);
}

// A file system without O_DIRECT (procfs here; tmpfs before Linux 6.6) is a clear error at open,
// not a failure at the first I/O.
TEST(CacheNoneOpen, FileSystemWithoutODirectIsAClearError) {
  try {
    RawImage::open("/proc/version", true, true, CacheMode::kNone);
    FAIL() << "O_DIRECT open of /proc/version succeeded";
  } catch (const std::system_error& e) {
    EXPECT_EQ(e.code().value(), EINVAL);
    EXPECT_NE(std::string(e.what()).find("does not support O_DIRECT (cache=none)"),
              std::string::npos)
        << e.what();
  }
  EXPECT_NO_THROW(RawImage::open("/proc/version", true, true, CacheMode::kWriteback));
}

// Every image operation that writes metadata, under O_DIRECT and through the page cache, with
// 512-byte clusters (eight per 4 KiB block: metadata and data share blocks) and 64 KiB ones.
class Qcow2CacheNoneTest : public ::testing::TestWithParam<uint32_t> {
 protected:
  void SetUp() override { require_qemu_tools(); }

  void fill(const std::string& path, CacheMode cache) {
    CreateOptions co;
    co.size = 8 << 20;
    co.cluster_size = GetParam();
    co.compression_type = CompressionType::kZstd;
    Image::create(path, co);
    OpenOptions oo;
    oo.read_only = false;
    oo.cache = cache;
    auto img = Image::open(path, oo);
    EXPECT_EQ(open_with_o_direct(path), cache == CacheMode::kNone);
    std::mt19937 rng(7);
    const uint64_t cluster = GetParam();
    img->write(1000, random_bytes(rng, 3000));
    img->write(5 * cluster + 17, random_bytes(rng, 2 * cluster));
    img->write(3 << 20, random_bytes(rng, 300 << 10));
    // Compressed clusters land at byte offsets, packed one after the other.
    for (uint64_t i = 0; i < 3; ++i) {
      std::vector<uint8_t> compressible(cluster, uint8_t(i));
      const auto noise = random_bytes(rng, cluster / 8);
      std::copy(noise.begin(), noise.end(), compressible.begin());
      img->write_compressed((6 << 20) + i * cluster, compressible);
    }
    img->write_zeroes(3 << 20, 64 << 10, true);
    img->flush();
  }

  TempDir dir_;
};

TEST_P(Qcow2CacheNoneTest, WritesTheSameFileAsThePageCache) {
  fill(dir_ / "direct.qcow2", CacheMode::kNone);
  fill(dir_ / "buffered.qcow2", CacheMode::kWriteback);
  EXPECT_EQ(read_file(dir_ / "direct.qcow2"), read_file(dir_ / "buffered.qcow2"));
  must("qemu-img check " + (dir_ / "direct.qcow2"));
  must("qemu-img compare " + (dir_ / "direct.qcow2") + " " + (dir_ / "buffered.qcow2"));

  // Reading back through O_DIRECT sees what qemu-img sees.
  OpenOptions ro;
  ro.cache = CacheMode::kNone;
  auto img = open_image(dir_ / "direct.qcow2", ro);
  std::vector<uint8_t> all(img->size());
  img->read(0, all);
  must("qemu-img convert -O raw " + (dir_ / "direct.qcow2") + " " + (dir_ / "direct.raw"));
  EXPECT_EQ(all, read_file(dir_ / "direct.raw"));
}

INSTANTIATE_TEST_SUITE_P(ClusterSizes, Qcow2CacheNoneTest, ::testing::Values(512u, 65536u));

}  // namespace
}  // namespace kiln::block::qcow2::testing
