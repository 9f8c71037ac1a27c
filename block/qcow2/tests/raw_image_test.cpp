// RawImage::block_status: SEEK_DATA/SEEK_HOLE runs, answered from the last run found on
// read-only images that keep writers out, and asked afresh on the others.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <vector>

#include "block/qcow2/qcow2.h"
#include "block/qcow2/tests/test_util.h"

namespace kiln::block::qcow2::testing {
namespace {

constexpr uint64_t kMiB = 1 << 20;

// 16 MiB, sparse: data in [2 MiB, 5 MiB) and [9 MiB, 10 MiB), holes elsewhere.
std::string make_sparse_file(const TempDir& dir) {
  const std::string path = dir / "sparse.raw";
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0644);
  EXPECT_GE(fd, 0);
  EXPECT_EQ(::ftruncate(fd, off_t(16 * kMiB)), 0);
  const std::vector<uint8_t> ones(kMiB, 1);
  for (uint64_t mib : {2, 3, 4, 9}) {
    EXPECT_EQ(::pwrite(fd, ones.data(), ones.size(), off_t(mib * kMiB)), ssize_t(kMiB));
  }
  ::close(fd);
  return path;
}

struct Expected {
  uint64_t offset, length, answer_length;
  ExtentKind kind;
};

void expect_statuses(RawImage& img, const std::vector<Expected>& cases) {
  for (const Expected& c : cases) {
    SCOPED_TRACE(::testing::Message() << "offset " << c.offset << " length " << c.length);
    const Extent e = img.block_status(c.offset, c.length);
    EXPECT_EQ(e.start, c.offset);
    EXPECT_EQ(e.length, c.answer_length);
    EXPECT_EQ(e.kind, c.kind);
    EXPECT_EQ(e.host_offset, c.kind == ExtentKind::kData ? c.offset : 0);
  }
}

// Chunk by chunk, then jumps inside, before and past the runs already seen.
const std::vector<Expected> kWalk = {
    {0, kMiB, kMiB, ExtentKind::kZero},
    {kMiB, kMiB, kMiB, ExtentKind::kZero},
    {2 * kMiB, kMiB, kMiB, ExtentKind::kData},
    {3 * kMiB, kMiB, kMiB, ExtentKind::kData},
    {4 * kMiB + 4096, 4 * kMiB, kMiB - 4096, ExtentKind::kData},  // ends where the run ends
    {5 * kMiB, 2 * kMiB, 2 * kMiB, ExtentKind::kZero},
    {2 * kMiB - 512, kMiB, 512, ExtentKind::kZero},  // back before the run seen last
    {6 * kMiB, 8 * kMiB, 3 * kMiB, ExtentKind::kZero},
    {9 * kMiB, 8 * kMiB, kMiB, ExtentKind::kData},
    {10 * kMiB, 8 * kMiB, 6 * kMiB, ExtentKind::kZero},  // clamped to the image's end
    {16 * kMiB, kMiB, kMiB, ExtentKind::kZero},          // past the end
};

TEST(RawImageBlockStatus, ReadOnlyImageAnswersFromTheRunsItFound) {
  TempDir dir;
  auto img = RawImage::open(make_sparse_file(dir), /*read_only=*/true, false);
  expect_statuses(*img, kWalk);
  expect_statuses(*img, kWalk);  // again, with the last run of the first walk remembered
}

TEST(RawImageBlockStatus, WritableImageSeesItsOwnWritesAtOnce) {
  TempDir dir;
  auto img = RawImage::open(make_sparse_file(dir), /*read_only=*/false, false);
  expect_statuses(*img, kWalk);
  EXPECT_EQ(img->block_status(12 * kMiB, kMiB).kind, ExtentKind::kZero);
  const std::vector<uint8_t> ones(kMiB, 1);
  img->write(12 * kMiB, ones);
  const Extent e = img->block_status(12 * kMiB, kMiB);
  EXPECT_EQ(e.kind, ExtentKind::kData);
  EXPECT_EQ(e.length, kMiB);
}

// -U: another process may write while we look, so a hole seen once is not remembered.
TEST(RawImageBlockStatus, SharedReadOnlyImageSeesAnotherWritersData) {
  TempDir dir;
  const std::string path = make_sparse_file(dir);
  auto img = RawImage::open(path, /*read_only=*/true, /*force_share=*/true);
  EXPECT_EQ(img->block_status(12 * kMiB, kMiB).kind, ExtentKind::kZero);
  const int fd = ::open(path.c_str(), O_WRONLY);
  ASSERT_GE(fd, 0);
  const std::vector<uint8_t> ones(kMiB, 1);
  EXPECT_EQ(::pwrite(fd, ones.data(), ones.size(), off_t(12 * kMiB)), ssize_t(kMiB));
  ::close(fd);
  EXPECT_EQ(img->block_status(12 * kMiB, kMiB).kind, ExtentKind::kData);
}

}  // namespace
}  // namespace kiln::block::qcow2::testing
