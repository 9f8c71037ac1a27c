// The rules shared by both engines for what one attempt's result means.
#include <gtest/gtest.h>

#include <cerrno>
#include <cstring>

#include "block/raw/io_engine.h"
#include "block/raw/raw_test_util.h"

namespace kiln::block::raw_internal {
namespace {

std::unique_ptr<IoOp> read_op(std::vector<iovec> iov, uint64_t offset = 0,
                              uint32_t direct_alignment = 1) {
  return IoOp::read(-1, offset, std::move(iov), direct_alignment, [](int) {});
}

TEST(IoOpTest, ShortTransferContinuesWhereItStopped) {
  char a[100], b[100], c[100];
  auto op = read_op({{a, 100}, {b, 100}, {c, 100}}, 1000);
  EXPECT_EQ(op->remaining(), 300u);

  Outcome outcome = account_result(*op, 150);
  EXPECT_FALSE(outcome.finished);
  EXPECT_EQ(op->offset, 1150u);
  EXPECT_EQ(op->remaining(), 150u);
  ASSERT_EQ(op->remaining_iov_count(), 2u);
  EXPECT_EQ(op->remaining_iov()[0].iov_base, b + 50);
  EXPECT_EQ(op->remaining_iov()[0].iov_len, 50u);

  outcome = account_result(*op, 150);
  EXPECT_TRUE(outcome.finished);
  EXPECT_EQ(outcome.result, 0);
}

TEST(IoOpTest, ReadAtEndOfFileZeroFillsTheRest) {
  char a[64], b[64];
  std::memset(a, 0x55, sizeof a);
  std::memset(b, 0x55, sizeof b);
  auto op = read_op({{a, 64}, {b, 64}});
  EXPECT_FALSE(account_result(*op, 32).finished);
  const Outcome outcome = account_result(*op, 0);
  EXPECT_TRUE(outcome.finished);
  EXPECT_EQ(outcome.result, 0);
  for (int i = 0; i < 32; ++i) EXPECT_EQ(a[i], 0x55);
  for (int i = 32; i < 64; ++i) EXPECT_EQ(a[i], 0);
  for (char byte : b) EXPECT_EQ(byte, 0);
}

TEST(IoOpTest, DirectReadEndingUnalignedIsTheEndOfTheFile) {
  char buffer[4096];
  std::memset(buffer, 0x55, sizeof buffer);
  auto op = read_op({{buffer, 4096}}, 0, 512);
  const Outcome outcome = account_result(*op, 1000);
  EXPECT_TRUE(outcome.finished);
  EXPECT_EQ(outcome.result, 0);
  EXPECT_EQ(buffer[999], 0x55);
  EXPECT_EQ(buffer[1000], 0);
  EXPECT_EQ(buffer[4095], 0);

  auto aligned_stop = read_op({{buffer, 4096}}, 0, 512);
  EXPECT_FALSE(account_result(*aligned_stop, 1024).finished) << "aligned: simply continue";
}

TEST(IoOpTest, RetriesOnAgainAndInterruptedWithoutLosingProgress) {
  char buffer[100];
  auto op = read_op({{buffer, 100}});
  EXPECT_FALSE(account_result(*op, 40).finished);
  EXPECT_FALSE(account_result(*op, -EAGAIN).finished);
  EXPECT_FALSE(account_result(*op, -EINTR).finished);
  EXPECT_EQ(op->remaining(), 60u);
  EXPECT_EQ(op->offset, 40u);
  EXPECT_TRUE(account_result(*op, 60).finished);
}

TEST(IoOpTest, ErrorsAndStalledWritesFinish) {
  char buffer[100];
  auto read = read_op({{buffer, 100}});
  const Outcome error = account_result(*read, -EIO);
  EXPECT_TRUE(error.finished);
  EXPECT_EQ(error.result, -EIO);

  auto write = IoOp::write(-1, 0, {{buffer, 100}}, [](int) {});
  const Outcome stalled = account_result(*write, 0);
  EXPECT_TRUE(stalled.finished);
  EXPECT_EQ(stalled.result, -EIO);
}

TEST(IoOpTest, NopCarriesItsPresetResultAndFallocateSucceedsWhole) {
  auto nop = IoOp::nop(-EROFS, [](int) {});
  EXPECT_EQ(account_result(*nop, 0).result, -EROFS);
  auto zero = IoOp::fallocate(-1, 0, 0, 4096, [](int) {});
  const Outcome outcome = account_result(*zero, 0);
  EXPECT_TRUE(outcome.finished);
  EXPECT_EQ(outcome.result, 0);
}

TEST(IoOpTest, RunSyncReadsARealFileAndZeroFillsPastItsEnd) {
  testing::ScratchFile file(100, [](uint64_t i) { return static_cast<uint8_t>(i + 1); });
  const int fd = ::open(file.path().c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  uint8_t buffer[300];
  std::memset(buffer, 0xFF, sizeof buffer);
  auto op = IoOp::read(fd, 50, {{buffer, 120}, {buffer + 120, 180}}, 1, [](int) {});
  EXPECT_EQ(run_sync(*op), 0);
  for (int i = 0; i < 50; ++i) EXPECT_EQ(buffer[i], 51 + i);
  for (int i = 50; i < 300; ++i) EXPECT_EQ(buffer[i], 0) << i;
  ::close(fd);
}

TEST(IoOpTest, RunSyncReportsErrorsAsNegativeErrno) {
  char buffer[16];
  auto op = IoOp::read(-1, 0, {{buffer, 16}}, 1, [](int) {});
  EXPECT_EQ(run_sync(*op), -EBADF);
}

}  // namespace
}  // namespace kiln::block::raw_internal
