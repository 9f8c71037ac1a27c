// Behaviour of the raw driver through the BlockDevice interface, for every engine and cache mode.
#include "block/raw/raw.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <random>
#include <thread>

#include "block/raw/raw_test_util.h"

namespace kiln::block {
namespace {

using testing::AlignedBytes;
using testing::read_sync;
using testing::ScratchFile;
using testing::wait_for;
using testing::write_sync;

struct Config {
  AioEngine engine;
  CacheMode cache;
};

std::string config_name(const ::testing::TestParamInfo<Config>& info) {
  return std::string(info.param.engine == AioEngine::kIoUring ? "IoUring" : "Threads") +
         (info.param.cache == CacheMode::kNone ? "Direct" : "Writeback");
}

uint8_t pattern(uint64_t offset) { return static_cast<uint8_t>(offset * 7 + (offset >> 9)); }

class RawDeviceTest : public ::testing::TestWithParam<Config> {
 protected:
  std::unique_ptr<RawBlockDevice> open(const ScratchFile& file, bool read_only = false,
                                       uint32_t queue_depth = 32) {
    RawOptions options;
    options.aio = GetParam().engine;
    options.cache = GetParam().cache;
    options.read_only = read_only;
    options.queue_depth = queue_depth;
    auto device = open_raw_device(file.path(), options);
    if (GetParam().engine == AioEngine::kIoUring && device->engine() != AioEngine::kIoUring) {
      ADD_FAILURE() << "io_uring is unavailable on this machine; the threads engine ran instead";
    }
    return device;
  }
  bool direct() const { return GetParam().cache == CacheMode::kNone; }
};

TEST_P(RawDeviceTest, ReportsSizeAndAlignment) {
  ScratchFile file(3 << 20);
  auto device = open(file);
  EXPECT_EQ(device->size(), 3u << 20);
  EXPECT_FALSE(device->read_only());
  EXPECT_FALSE(device->is_block_device());
  if (direct()) {
    EXPECT_GE(device->alignment(), 512u);
    EXPECT_LE(device->alignment(), 4096u);
    EXPECT_EQ(device->alignment() & (device->alignment() - 1), 0u) << "a power of two";
  } else {
    EXPECT_EQ(device->alignment(), 1u);
  }
}

TEST_P(RawDeviceTest, MultiIovecRoundTrip) {
  ScratchFile file(1 << 20);
  auto device = open(file);
  AlignedBytes a(4096), b(8192), c(4096);
  for (size_t i = 0; i < 4096; ++i) a.data()[i] = pattern(i);
  for (size_t i = 0; i < 8192; ++i) b.data()[i] = pattern(4096 + i);
  for (size_t i = 0; i < 4096; ++i) c.data()[i] = pattern(12288 + i);
  ASSERT_EQ(write_sync(*device, 65536, {{a.data(), 4096}, {b.data(), 8192}, {c.data(), 4096}}), 0);

  // Read back split differently, including a zero-length entry.
  AlignedBytes x(12288, 0xEE), y(4096, 0xEE);
  ASSERT_EQ(read_sync(*device, 65536, {{x.data(), 12288}, {y.data(), 0}, {y.data(), 4096}}), 0);
  for (size_t i = 0; i < 12288; ++i) ASSERT_EQ(x.data()[i], pattern(i)) << i;
  for (size_t i = 0; i < 4096; ++i) ASSERT_EQ(y.data()[i], pattern(12288 + i)) << i;

  // Another reader of the file sees the same bytes.
  const auto on_disk = file.contents(65536, 16384);
  for (size_t i = 0; i < on_disk.size(); ++i) ASSERT_EQ(on_disk[i], pattern(i)) << i;
}

// The kernel takes at most IOV_MAX (1024) vectors per call; longer lists go in several calls.
TEST_P(RawDeviceTest, MoreVectorsThanTheKernelTakesAtOnce) {
  constexpr size_t kVectors = 2500;
  constexpr size_t kPiece = 512;
  ScratchFile file(kVectors * kPiece);
  auto device = open(file);
  AlignedBytes out(kVectors * kPiece), in(kVectors * kPiece, 0xEE);
  std::vector<iovec> out_iov, in_iov;
  for (size_t i = 0; i < kVectors; ++i) {
    std::memset(out.data() + i * kPiece, static_cast<int>(i % 253), kPiece);
    // Scattered: piece i of the disk lives at slot (i * 7) % kVectors of the buffer.
    const size_t slot = (i * 7) % kVectors;
    out_iov.push_back({out.data() + slot * kPiece, kPiece});
    in_iov.push_back({in.data() + slot * kPiece, kPiece});
  }
  ASSERT_EQ(testing::write_sync(*device, 0, out_iov), 0);
  ASSERT_EQ(testing::read_sync(*device, 0, in_iov), 0);
  EXPECT_EQ(0, std::memcmp(in.data(), out.data(), kVectors * kPiece));
  const auto on_disk = file.contents(0, kVectors * kPiece);
  for (size_t i = 0; i < kVectors; ++i) {
    ASSERT_EQ(on_disk[i * kPiece], (i * 7) % kVectors % 253) << "piece " << i;
  }
}

TEST_P(RawDeviceTest, ManyConcurrentRequestsFromFourThreads) {
  constexpr int kThreads = 4;
  constexpr int kPerThread = 64;  // 256 in flight against a queue depth of 32
  constexpr size_t kBlock = 4096;
  ScratchFile file(kThreads * kPerThread * kBlock);
  auto device = open(file, false, 32);

  auto fill_for = [](int request, uint8_t* data) {
    for (size_t i = 0; i < kBlock; ++i) data[i] = static_cast<uint8_t>(request * 31 + i / 16);
  };
  std::vector<std::unique_ptr<AlignedBytes>> buffers;
  for (int r = 0; r < kThreads * kPerThread; ++r) {
    buffers.push_back(std::make_unique<AlignedBytes>(kBlock));
    fill_for(r, buffers.back()->data());
  }

  // All writes in flight at once, then all reads (into fresh buffers) at once.
  for (bool writing : {true, false}) {
    if (!writing) {
      for (auto& buffer : buffers) std::memset(buffer->data(), 0, kBlock);
    }
    std::atomic<int> completed{0}, failed{0}, last_error{0};
    std::vector<std::thread> submitters;
    for (int t = 0; t < kThreads; ++t) {
      submitters.emplace_back([&, t] {
        for (int k = 0; k < kPerThread; ++k) {
          // Interleave the threads' blocks so neighbours come from different threads.
          const int request = k * kThreads + t;
          iovec iov{buffers[request]->data(), kBlock};
          auto done = [&](int result) {
            if (result != 0) {
              ++failed;
              last_error = result;
            }
            ++completed;
          };
          if (writing) {
            device->write(request * kBlock, {&iov, 1}, done);
          } else {
            device->read(request * kBlock, {&iov, 1}, done);
          }
        }
      });
    }
    for (auto& submitter : submitters) submitter.join();
    device->drain();
    EXPECT_EQ(completed, kThreads * kPerThread);
    EXPECT_EQ(failed, 0) << (writing ? "writing" : "reading") << ", last error " << last_error;
  }
  std::vector<uint8_t> expected(kBlock);
  for (int r = 0; r < kThreads * kPerThread; ++r) {
    fill_for(r, expected.data());
    ASSERT_EQ(0, std::memcmp(buffers[r]->data(), expected.data(), kBlock)) << "request " << r;
  }
}

// io_uring cancels a request when the thread that submitted it exits; the driver must not let
// a guest's write die with, say, a vCPU thread.
TEST_P(RawDeviceTest, RequestsOutliveTheThreadThatSubmittedThem) {
  constexpr uint64_t kMiB = 1 << 20;
  ScratchFile file(8 * kMiB);
  auto device = open(file);
  AlignedBytes data(8 * kMiB, 0x6B);
  std::atomic<int> succeeded{0};
  auto count_success = [&](int result) {
    if (result == 0) ++succeeded;
  };
  // Threads racing on one file make io_uring punt writes to its workers, whose queued work is
  // what the cancellation strikes; each thread is gone before its writes are done.
  std::vector<std::thread> threads;
  for (uint64_t t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (uint64_t i = t; i < 64; i += 4) {
        iovec iov{data.data() + i * kMiB / 8, kMiB / 8};
        device->write(i * kMiB / 8, {&iov, 1}, count_success);
      }
      device->flush(count_success);
    });
  }
  for (auto& thread : threads) thread.join();
  device->drain();
  EXPECT_EQ(succeeded, 68);
  EXPECT_EQ(file.contents(7 * kMiB, kMiB), std::vector<uint8_t>(kMiB, 0x6B));
}

TEST_P(RawDeviceTest, FlushSucceedsAfterWrites) {
  ScratchFile file(1 << 20);
  auto device = open(file);
  AlignedBytes data(4096, 0x5A);
  ASSERT_EQ(write_sync(*device, 8192, data.data(), 4096), 0);
  EXPECT_EQ(wait_for([&](Completion done) { device->flush(std::move(done)); }), 0);
  EXPECT_EQ(file.contents(8192, 4096), std::vector<uint8_t>(4096, 0x5A));
}

TEST_P(RawDeviceTest, DiscardLeavesZerosAndFreesBlocks) {
  constexpr uint64_t kMiB = 1 << 20;
  ScratchFile file(4 * kMiB, [](uint64_t) { return uint8_t{0xAB}; });
  auto device = open(file);
  ASSERT_EQ(wait_for([&](Completion done) { device->flush(std::move(done)); }), 0);
  const auto blocks_before = file.stat().st_blocks;

  ASSERT_EQ(wait_for([&](Completion done) { device->discard(kMiB, 2 * kMiB, std::move(done)); }),
            0);
  AlignedBytes back(4 * kMiB, 0xEE);
  ASSERT_EQ(read_sync(*device, 0, back.data(), 4 * kMiB), 0);
  EXPECT_EQ(back.bytes(0, kMiB), std::vector<uint8_t>(kMiB, 0xAB));
  EXPECT_EQ(back.bytes(kMiB, 2 * kMiB), std::vector<uint8_t>(2 * kMiB, 0));
  EXPECT_EQ(back.bytes(3 * kMiB, kMiB), std::vector<uint8_t>(kMiB, 0xAB));
  // st_blocks counts 512-byte units: two MiB less are allocated.
  EXPECT_LE(file.stat().st_blocks, blocks_before - static_cast<blkcnt_t>(2 * kMiB / 512));
  const BlockStatus status = device->block_status(kMiB, 2 * kMiB);
  EXPECT_FALSE(status.data);
  EXPECT_EQ(status.length, 2 * kMiB);
}

TEST_P(RawDeviceTest, WriteZeroesWithAndWithoutUnmap) {
  ScratchFile file(1 << 20, [](uint64_t) { return uint8_t{0xCD}; });
  auto device = open(file);
  for (bool may_unmap : {false, true}) {
    const uint64_t offset = may_unmap ? 300000 : 4096;  // unaligned and aligned ranges
    const uint64_t length = may_unmap ? 70001 : 65536;
    ASSERT_EQ(wait_for([&](Completion done) {
                device->write_zeroes(offset, length, may_unmap, std::move(done));
              }),
              0);
    AlignedBytes back(length + 2, 0xEE);
    ASSERT_EQ(read_sync(*device, offset - 1, back.data(), length + 2), 0);
    EXPECT_EQ(back.data()[0], 0xCD);
    EXPECT_EQ(back.bytes(1, length), std::vector<uint8_t>(length, 0));
    EXPECT_EQ(back.data()[length + 1], 0xCD);
  }
}

TEST_P(RawDeviceTest, ReadPastEndOfShrunkFileReadsZeros) {
  ScratchFile file(65536, pattern);
  auto device = open(file);
  // Someone shrinks the file under the open device: the disk keeps its size, the tail is zeros.
  ASSERT_EQ(::truncate(file.path().c_str(), 16384), 0);
  AlignedBytes back(32768, 0xEE);
  ASSERT_EQ(read_sync(*device, 8192, back.data(), 32768), 0);
  for (size_t i = 0; i < 8192; ++i) ASSERT_EQ(back.data()[i], pattern(8192 + i)) << i;
  EXPECT_EQ(back.bytes(8192, 24576), std::vector<uint8_t>(24576, 0));
}

TEST_P(RawDeviceTest, FileSizeNotAMultipleOfTheBlockSize) {
  ScratchFile file(1000, pattern);
  auto device = open(file);
  EXPECT_EQ(device->size(), 1000u);
  AlignedBytes back(1000, 0xEE);
  ASSERT_EQ(read_sync(*device, 0, back.data(), 1000), 0);
  for (size_t i = 0; i < 1000; ++i) ASSERT_EQ(back.data()[i], pattern(i)) << i;

  const std::vector<uint8_t> tail(10, 0x77);
  ASSERT_EQ(write_sync(*device, 990, tail.data(), tail.size()), 0);
  ASSERT_EQ(read_sync(*device, 0, back.data(), 1000), 0);
  for (size_t i = 0; i < 990; ++i) ASSERT_EQ(back.data()[i], pattern(i)) << i;
  EXPECT_EQ(back.bytes(990, 10), tail);
}

TEST_P(RawDeviceTest, RequestsBeyondTheEndAreRejected) {
  ScratchFile file(65536);
  auto device = open(file);
  AlignedBytes data(8192);
  EXPECT_EQ(read_sync(*device, 61440, data.data(), 8192), -EINVAL);
  EXPECT_EQ(write_sync(*device, 65536, data.data(), 4096), -EINVAL);
  EXPECT_EQ(read_sync(*device, UINT64_MAX - 100, data.data(), 4096), -EINVAL);
  EXPECT_EQ(wait_for([&](Completion done) { device->discard(0, 65537, std::move(done)); }),
            -EINVAL);
  EXPECT_EQ(read_sync(*device, 65536, data.data(), 0), 0) << "empty request at the end";
  EXPECT_EQ(file.stat().st_size, 65536);
}

TEST_P(RawDeviceTest, ReadOnlyRefusesEveryChange) {
  ScratchFile file(65536, pattern);
  auto device = open(file, /*read_only=*/true);
  EXPECT_TRUE(device->read_only());
  AlignedBytes data(4096, 0x11);
  EXPECT_EQ(write_sync(*device, 0, data.data(), 4096), -EROFS);
  EXPECT_EQ(wait_for([&](Completion done) { device->discard(0, 4096, std::move(done)); }), -EROFS);
  EXPECT_EQ(
      wait_for([&](Completion done) { device->write_zeroes(0, 4096, true, std::move(done)); }),
      -EROFS);
  EXPECT_EQ(wait_for([&](Completion done) { device->flush(std::move(done)); }), 0);
  ASSERT_EQ(read_sync(*device, 0, data.data(), 4096), 0);
  for (size_t i = 0; i < 4096; ++i) ASSERT_EQ(data.data()[i], pattern(i));
  const auto on_disk = file.contents(0, 65536);
  for (size_t i = 0; i < on_disk.size(); ++i) ASSERT_EQ(on_disk[i], pattern(i));
}

// Odd offsets, odd lengths, buffers one byte off alignment: checked against a model of the disk.
TEST_P(RawDeviceTest, UnalignedRequestsMatchAModel) {
  constexpr uint64_t kSize = 256 * 1024;
  ScratchFile file(kSize, pattern);
  auto device = open(file);
  std::vector<uint8_t> model(kSize);
  for (uint64_t i = 0; i < kSize; ++i) model[i] = pattern(i);

  std::mt19937_64 random(42);
  AlignedBytes buffer(70000);
  for (int round = 0; round < 300; ++round) {
    const uint64_t length = 1 + random() % 20000;
    const uint64_t offset = random() % (kSize - length);
    uint8_t* data = buffer.data() + 1 + random() % 7;
    const size_t split = length / 3;
    std::vector<iovec> iov{{data, split}, {data + split + 5, length - split}};
    if (random() % 2) {
      for (uint64_t i = 0; i < length; ++i) {
        const uint8_t value = static_cast<uint8_t>(random());
        (i < split ? data[i] : data[i + 5]) = value;
        model[offset + i] = value;
      }
      ASSERT_EQ(testing::write_sync(*device, offset, iov), 0) << "round " << round;
    } else {
      ASSERT_EQ(testing::read_sync(*device, offset, iov), 0) << "round " << round;
      for (uint64_t i = 0; i < length; ++i) {
        ASSERT_EQ(i < split ? data[i] : data[i + 5], model[offset + i])
            << "round " << round << " byte " << i;
      }
    }
  }
  ASSERT_EQ(wait_for([&](Completion done) { device->flush(std::move(done)); }), 0);
  EXPECT_EQ(file.contents(0, kSize), model);
}

// Many small writes into the same block at once: under O_DIRECT each is a read-modify-write of
// that block, and without serialisation most of them would be lost.
TEST_P(RawDeviceTest, ConcurrentOverlappingUnalignedWritesAllLand) {
  ScratchFile file(65536);
  auto device = open(file, false, 16);
  constexpr int kWriters = 4;
  constexpr int kPieces = 96;  // each 13 bytes, packed into the first 1248 bytes
  std::vector<std::vector<uint8_t>> pieces(kPieces);
  for (int p = 0; p < kPieces; ++p) pieces[p].assign(13, static_cast<uint8_t>(p + 1));
  std::atomic<int> failures{0};
  std::vector<std::thread> writers;
  for (int w = 0; w < kWriters; ++w) {
    writers.emplace_back([&, w] {
      for (int p = w; p < kPieces; p += kWriters) {
        iovec iov{pieces[p].data(), 13};
        device->write(p * 13 + 100, {&iov, 1}, [&](int result) {
          if (result != 0) ++failures;
        });
      }
    });
  }
  for (auto& writer : writers) writer.join();
  device->drain();
  EXPECT_EQ(failures, 0);
  std::vector<uint8_t> back(kPieces * 13);
  ASSERT_EQ(read_sync(*device, 100, back.data(), back.size()), 0);
  for (int p = 0; p < kPieces; ++p) {
    EXPECT_EQ(std::vector<uint8_t>(back.begin() + p * 13, back.begin() + p * 13 + 13), pieces[p])
        << "piece " << p;
  }
}

TEST_P(RawDeviceTest, DrainWaitsForEveryCompletion) {
  ScratchFile file(1 << 20);
  auto device = open(file);
  AlignedBytes data(4096, 0x42);
  std::atomic<int> finished{0};
  for (int i = 0; i < 64; ++i) {
    iovec iov{data.data(), 4096};
    device->write(i * 4096, {&iov, 1}, [&](int) {
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
      ++finished;
    });
  }
  device->drain();
  EXPECT_EQ(finished, 64);
  device->drain();  // nothing in flight: returns at once
}

TEST_P(RawDeviceTest, CompletionsMaySubmitMoreRequests) {
  ScratchFile file(1 << 20, pattern);
  auto device = open(file, false, 1);
  AlignedBytes data(4096);
  std::promise<int> all_done;
  std::function<void(int, int)> next = [&](int index, int result) {
    if (result != 0 || index == 100) {
      all_done.set_value(result == 0 ? index : result);
      return;
    }
    iovec iov{data.data(), 4096};
    device->read((index % 256) * 4096, {&iov, 1}, [&, index](int r) { next(index + 1, r); });
  };
  next(0, 0);
  auto future = all_done.get_future();
  ASSERT_EQ(future.wait_for(std::chrono::seconds(30)), std::future_status::ready);
  EXPECT_EQ(future.get(), 100);
  device->drain();
}

TEST_P(RawDeviceTest, DestroyingWithRequestsInFlightWaitsForThem) {
  ScratchFile file(1 << 20);
  auto device = open(file);
  AlignedBytes data(4096, 0x99);
  std::atomic<int> finished{0};
  for (int i = 0; i < 32; ++i) {
    iovec iov{data.data(), 4096};
    device->write(i * 4096, {&iov, 1}, [&](int result) {
      if (result == 0) ++finished;
    });
  }
  device.reset();
  EXPECT_EQ(finished, 32);
  EXPECT_EQ(file.contents(31 * 4096, 4096), std::vector<uint8_t>(4096, 0x99));
}

INSTANTIATE_TEST_SUITE_P(AllEngines, RawDeviceTest,
                         ::testing::Values(Config{AioEngine::kIoUring, CacheMode::kWriteback},
                                           Config{AioEngine::kThreads, CacheMode::kWriteback},
                                           Config{AioEngine::kIoUring, CacheMode::kNone},
                                           Config{AioEngine::kThreads, CacheMode::kNone}),
                         config_name);

}  // namespace
}  // namespace kiln::block
