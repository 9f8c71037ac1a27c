// The raw driver on a real block device: a loop device over a scratch file. Skipped where loop
// devices cannot be attached (no privilege, no loop driver).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/loop.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <cstring>

#include "block/raw/raw.h"
#include "block/raw/raw_test_util.h"

namespace kiln::block {
namespace {

using testing::AlignedBytes;
using testing::read_sync;
using testing::ScratchFile;
using testing::wait_for;
using testing::write_sync;

constexpr uint64_t kDiskSize = 8 << 20;

// A loop device over a file, detached at the end (and by the kernel, with AUTOCLEAR, should the
// test die with it attached).
class LoopDevice {
 public:
  LoopDevice(const std::string& backing, uint32_t logical_block_size) {
    const int control = ::open("/dev/loop-control", O_RDWR | O_CLOEXEC);
    if (control < 0) return;
    for (int attempt = 0; attempt < 20 && fd_ < 0; ++attempt) {
      const int number = ::ioctl(control, LOOP_CTL_GET_FREE);
      if (number < 0) break;
      try_attach("/dev/loop" + std::to_string(number), backing, logical_block_size);
    }
    ::close(control);
  }
  ~LoopDevice() {
    if (fd_ < 0) return;
    ::ioctl(fd_, LOOP_CLR_FD, 0);
    ::close(fd_);
  }
  LoopDevice(const LoopDevice&) = delete;
  LoopDevice& operator=(const LoopDevice&) = delete;

  bool attached() const { return fd_ >= 0; }
  const std::string& path() const { return path_; }

 private:
  void try_attach(const std::string& path, const std::string& backing, uint32_t block_size) {
    const int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
    const int backing_fd = ::open(backing.c_str(), O_RDWR | O_CLOEXEC);
    const bool ok = fd >= 0 && backing_fd >= 0 && ::ioctl(fd, LOOP_SET_FD, backing_fd) == 0;
    if (backing_fd >= 0) ::close(backing_fd);
    if (!ok) {
      if (fd >= 0) ::close(fd);
      return;  // taken by someone else meanwhile: try the next free one
    }
    loop_info64 info{};
    info.lo_flags = LO_FLAGS_AUTOCLEAR;
    ::ioctl(fd, LOOP_SET_STATUS64, &info);
    if (block_size != 512 && ::ioctl(fd, LOOP_SET_BLOCK_SIZE, block_size) != 0) {
      ::ioctl(fd, LOOP_CLR_FD, 0);
      ::close(fd);
      return;
    }
    fd_ = fd;
    path_ = path;
  }

  int fd_ = -1;
  std::string path_;
};

class RawBlockDeviceTest : public ::testing::TestWithParam<AioEngine> {
 protected:
  void SetUp() override {
    loop_ = std::make_unique<LoopDevice>(backing_.path(), 4096);
    if (!loop_->attached()) GTEST_SKIP() << "cannot attach a loop device here";
  }
  std::unique_ptr<RawBlockDevice> open(CacheMode cache) {
    RawOptions options;
    options.aio = GetParam();
    options.cache = cache;
    return open_raw_device(loop_->path(), options);
  }

  ScratchFile backing_{kDiskSize, [](uint64_t) { return uint8_t{0xAB}; }};
  std::unique_ptr<LoopDevice> loop_;
};

TEST_P(RawBlockDeviceTest, SizeComesFromTheDevice) {
  auto device = open(CacheMode::kWriteback);
  EXPECT_TRUE(device->is_block_device());
  EXPECT_EQ(device->size(), kDiskSize);
  EXPECT_EQ(device->alignment(), 1u);
  EXPECT_TRUE(device->block_status(0, kDiskSize).data);
}

TEST_P(RawBlockDeviceTest, DirectIoUsesTheLogicalBlockSizeAndBouncesTheRest) {
  auto device = open(CacheMode::kNone);
  EXPECT_EQ(device->alignment(), 4096u);
  std::vector<uint8_t> data(5000);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<uint8_t>(i % 251);
  ASSERT_EQ(write_sync(*device, 1000, data.data(), data.size()), 0);
  AlignedBytes back(8192, 0xEE);
  ASSERT_EQ(read_sync(*device, 0, back.data(), 8192), 0);
  EXPECT_EQ(back.bytes(0, 1000), std::vector<uint8_t>(1000, 0xAB));
  EXPECT_EQ(back.bytes(1000, 5000), data);
  EXPECT_EQ(back.bytes(6000, 2192), std::vector<uint8_t>(2192, 0xAB));
}

TEST_P(RawBlockDeviceTest, DiscardAndWriteZeroes) {
  auto device = open(CacheMode::kNone);
  constexpr uint64_t kMiB = 1 << 20;
  ASSERT_EQ(wait_for([&](Completion done) { device->discard(kMiB, kMiB, std::move(done)); }), 0);
  // An unaligned discard only covers the whole blocks inside it, and never fails.
  ASSERT_EQ(
      wait_for([&](Completion done) { device->discard(3 * kMiB + 100, 5000, std::move(done)); }),
      0);
  ASSERT_EQ(wait_for([&](Completion done) {
              device->write_zeroes(5 * kMiB + 7, 10000, false, std::move(done));
            }),
            0);
  AlignedBytes back(kDiskSize, 0xEE);
  ASSERT_EQ(read_sync(*device, 0, back.data(), kDiskSize), 0);
  EXPECT_EQ(back.bytes(kMiB - 4096, 4096), std::vector<uint8_t>(4096, 0xAB));
  EXPECT_EQ(back.bytes(kMiB, kMiB), std::vector<uint8_t>(kMiB, 0)) << "loop discards punch holes";
  EXPECT_EQ(back.bytes(3 * kMiB, 4096), std::vector<uint8_t>(4096, 0xAB));
  EXPECT_EQ(back.bytes(5 * kMiB, 7), std::vector<uint8_t>(7, 0xAB));
  EXPECT_EQ(back.bytes(5 * kMiB + 7, 10000), std::vector<uint8_t>(10000, 0));
  EXPECT_EQ(back.data()[5 * kMiB + 10007], 0xAB);
}

INSTANTIATE_TEST_SUITE_P(AllEngines, RawBlockDeviceTest,
                         ::testing::Values(AioEngine::kIoUring, AioEngine::kThreads),
                         [](const auto& info) {
                           return info.param == AioEngine::kIoUring ? "IoUring" : "Threads";
                         });

}  // namespace
}  // namespace kiln::block
