// 4 KiB random reads at queue depth 32 through the raw driver: io_uring against the thread pool,
// with and without the page cache. The image is a scratch file in the current directory (or
// $KILN_BENCH_DIR), which must be on a disk-backed file system for the O_DIRECT cases.
//
//   build/bench/block_aio_bench --benchmark_filter=Direct
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "block/raw/raw.h"

namespace kiln::block {
namespace {

constexpr uint64_t kImageSize = 64 << 20;
constexpr uint64_t kBlock = 4096;
constexpr int kQueueDepth = 32;
constexpr int kReadsPerIteration = 1024;

// The scratch image, written once with non-zero data so reads hit allocated blocks.
const std::string& image_path() {
  static const std::string path = [] {
    const char* dir = std::getenv("KILN_BENCH_DIR");
    std::string file = std::string(dir ? dir : ".") + "/block_aio_bench.img";
    const int fd = ::open(file.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) std::abort();
    std::vector<char> chunk(1 << 20, 0x5A);
    for (uint64_t offset = 0; offset < kImageSize; offset += chunk.size()) {
      if (::pwrite(fd, chunk.data(), chunk.size(), static_cast<off_t>(offset)) < 0) std::abort();
    }
    ::fsync(fd);
    ::close(fd);
    return file;
  }();
  return path;
}

// Keeps kQueueDepth reads in flight: each completion submits the next until `total` are done.
class ReadStream {
 public:
  ReadStream(BlockDevice& device, const std::vector<uint64_t>& offsets)
      : device_(device), offsets_(offsets) {
    for (int slot = 0; slot < kQueueDepth; ++slot) {
      void* memory = nullptr;
      if (posix_memalign(&memory, 4096, kBlock) != 0) std::abort();
      buffers_.push_back(static_cast<char*>(memory));
    }
  }
  ~ReadStream() {
    for (char* buffer : buffers_) std::free(buffer);
  }

  void run(int total) {
    next_ = 0;
    remaining_ = total;
    total_ = total;
    for (int slot = 0; slot < kQueueDepth && slot < total; ++slot) issue(slot);
    std::unique_lock lock(mutex_);
    finished_.wait(lock, [this] { return remaining_ == 0; });
  }

  bool failed() const { return failed_; }

 private:
  void issue(int slot) {
    const int index = next_++;
    if (index >= total_) return;
    iovec iov{buffers_[slot], kBlock};
    device_.read(offsets_[index % offsets_.size()], {&iov, 1}, [this, slot](int result) {
      if (result != 0) failed_ = true;
      issue(slot);
      std::lock_guard lock(mutex_);
      if (--remaining_ == 0) finished_.notify_one();
    });
  }

  BlockDevice& device_;
  const std::vector<uint64_t>& offsets_;
  std::vector<char*> buffers_;
  std::atomic<int> next_{0};
  int total_ = 0;
  std::atomic<bool> failed_{false};
  std::mutex mutex_;
  std::condition_variable finished_;
  int remaining_ = 0;
};

void random_reads(benchmark::State& state, AioEngine engine, CacheMode cache) {
  RawOptions options;
  options.aio = engine;
  options.cache = cache;
  options.queue_depth = kQueueDepth;
  options.read_only = true;
  auto device = open_raw_device(image_path(), options);
  if (device->engine() != engine) {
    state.SkipWithError("io_uring unavailable");
    return;
  }
  std::mt19937_64 random(1);
  std::vector<uint64_t> offsets(1 << 16);
  for (auto& offset : offsets) offset = (random() % (kImageSize / kBlock)) * kBlock;

  ReadStream stream(*device, offsets);
  for (auto _ : state) stream.run(kReadsPerIteration);
  if (stream.failed()) state.SkipWithError("a read failed");
  state.SetItemsProcessed(state.iterations() * kReadsPerIteration);
  state.SetBytesProcessed(state.iterations() * kReadsPerIteration * kBlock);
}

BENCHMARK_CAPTURE(random_reads, IoUringDirect, AioEngine::kIoUring, CacheMode::kNone)
    ->UseRealTime();
BENCHMARK_CAPTURE(random_reads, ThreadsDirect, AioEngine::kThreads, CacheMode::kNone)
    ->UseRealTime();
BENCHMARK_CAPTURE(random_reads, IoUringCached, AioEngine::kIoUring, CacheMode::kWriteback)
    ->UseRealTime();
BENCHMARK_CAPTURE(random_reads, ThreadsCached, AioEngine::kThreads, CacheMode::kWriteback)
    ->UseRealTime();

}  // namespace
}  // namespace kiln::block

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  ::unlink(kiln::block::image_path().c_str());
  return 0;
}
