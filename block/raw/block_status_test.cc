// SEEK_DATA/SEEK_HOLE as seen through block_status(), on a sparse file of the build tree's
// file system.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <vector>

#include "block/raw/raw.h"
#include "block/raw/raw_test_util.h"

namespace kiln::block {
namespace {

constexpr uint64_t kMiB = 1 << 20;

class BlockStatusTest : public ::testing::Test {
 protected:
  void SetUp() override {
    fd_ = ::open(file_.path().c_str(), O_RDWR | O_CLOEXEC);
    ASSERT_GE(fd_, 0);
    const std::vector<uint8_t> data(64 * 1024, 0x12);
    ASSERT_EQ(::pwrite(fd_, data.data(), data.size(), kMiB), static_cast<ssize_t>(data.size()));
    ASSERT_EQ(::fsync(fd_), 0);
    // Some file systems do not track holes; then everything is data and these tests say nothing.
    if (::lseek(fd_, 0, SEEK_DATA) != static_cast<off_t>(kMiB)) {
      GTEST_SKIP() << "file system without hole tracking";
    }
  }
  void TearDown() override { ::close(fd_); }

  testing::ScratchFile file_{4 * kMiB};
  int fd_ = -1;
};

TEST_F(BlockStatusTest, LeadingHoleThenDataThenTrailingHole) {
  BlockStatus status = block_status(fd_, 0, 4 * kMiB);
  EXPECT_FALSE(status.data);
  EXPECT_EQ(status.length, kMiB);

  status = block_status(fd_, kMiB, 4 * kMiB);
  EXPECT_TRUE(status.data);
  EXPECT_EQ(status.length, 64u * 1024);

  status = block_status(fd_, kMiB + 64 * 1024, 10 * kMiB);
  EXPECT_FALSE(status.data);
  EXPECT_EQ(status.length, 10 * kMiB) << "a trailing hole runs to the query's end";
}

TEST_F(BlockStatusTest, LengthIsClampedToTheQuery) {
  BlockStatus status = block_status(fd_, 4096, 8192);
  EXPECT_FALSE(status.data);
  EXPECT_EQ(status.length, 8192u);
  status = block_status(fd_, kMiB + 4096, 100);
  EXPECT_TRUE(status.data);
  EXPECT_EQ(status.length, 100u);
}

TEST_F(BlockStatusTest, DeviceClampsToItsSize) {
  auto device = open_raw_device(file_.path());
  BlockStatus status = device->block_status(3 * kMiB, 100 * kMiB);
  EXPECT_FALSE(status.data);
  EXPECT_EQ(status.length, kMiB);
  EXPECT_EQ(device->block_status(4 * kMiB, 4096).length, 0u);
  status = device->block_status(kMiB, kMiB);
  EXPECT_TRUE(status.data);
  EXPECT_EQ(status.length, 64u * 1024);
}

TEST(BlockStatusFreeTest, FilesWithoutHoleSupportReportData) {
  // A pipe cannot seek at all: everything counts as data rather than an error.
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  const BlockStatus status = block_status(fds[0], 0, 4096);
  EXPECT_TRUE(status.data);
  EXPECT_EQ(status.length, 4096u);
  ::close(fds[0]);
  ::close(fds[1]);
}

}  // namespace
}  // namespace kiln::block
