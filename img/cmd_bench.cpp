// kiln-img bench: qemu-img bench's request generator. Sends `count` reads or writes of one size,
// `depth` of them in flight at once through the asynchronous BlockDevice interface (io_uring for
// raw files, the qcow2 device's worker pool for qcow2), and reports the wall-clock time.
#include <fmt/format.h>
#include <getopt.h>

#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#include "block/qcow2/qcow2_device.h"
#include "block/raw/raw.h"
#include "img/common.h"

namespace kiln::img {
namespace {

constexpr const char* kSizeHint =
    ". You may use k, M, G, T, P or E suffixes for\n"
    "kiln-img: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.";

struct BenchOptions {
  uint64_t count = 75000;
  uint64_t depth = 64;
  uint64_t offset = 0;
  uint64_t bufsize = 4096;
  uint64_t step = 0;  // 0: bufsize
  uint64_t flush_interval = 0;
  bool drain_on_flush = true;
  bool write = false;
  bool force_share = false;
  bool native_aio = false;
  int pattern = 0;
  std::string fmt, cache = "writeback", file;
  // "" = io_uring: the ring is what keeps `depth` requests in the kernel at once.
  std::string aio;
};

// qemu_strtoul(..., base 0, ...) limited to INT_MAX, as qemu-img bench parses its counts.
bool parse_count(const char* text, uint64_t& out) {
  if (!text || !*text || *text == '-') return false;
  char* end = nullptr;
  errno = 0;
  const unsigned long long v = std::strtoull(text, &end, 0);
  if (errno != 0 || *end != '\0' || v > INT_MAX) return false;
  out = v;
  return true;
}

uint64_t parse_size_arg(const char* text, const char* what) {
  try {
    if (*text == '-') throw std::invalid_argument("negative");
    return block::qcow2::parse_size(text);
  } catch (const std::exception&) {
    throw UsageError(fmt::format("Invalid {} specified{}", what, kSizeHint));
  }
}

BenchOptions parse_args(int argc, char** argv) {
  enum { kFlushInterval = 256, kNoDrain, kPattern };
  static const option kLong[] = {{"help", no_argument, nullptr, 'h'},
                                 {"flush-interval", required_argument, nullptr, kFlushInterval},
                                 {"image-opts", no_argument, nullptr, 'I'},
                                 {"pattern", required_argument, nullptr, kPattern},
                                 {"no-drain", no_argument, nullptr, kNoDrain},
                                 {"force-share", no_argument, nullptr, 'U'},
                                 {nullptr, 0, nullptr, 0}};
  BenchOptions o;
  optind = 1;
  for (int c; (c = getopt_long(argc, argv, ":hc:d:f:ni:o:qs:S:t:wU", kLong, nullptr)) != -1;) {
    switch (c) {
      case 'c':
        if (!parse_count(optarg, o.count)) throw UsageError("Invalid request count specified");
        break;
      case 'd':
        // qemu-img accepts 0 and then waits forever; refusing it is the useful reading.
        if (!parse_count(optarg, o.depth) || o.depth == 0)
          throw UsageError("Invalid queue depth specified");
        break;
      case 'f':
        o.fmt = optarg;
        break;
      case 'n':
        o.native_aio = true;
        break;
      case 'i':
        o.aio = optarg;
        if (o.aio != "native" && o.aio != "threads" && o.aio != "io_uring")
          throw UsageError(fmt::format("Invalid aio option: {}", o.aio));
        break;
      case 'o':
        o.offset = parse_size_arg(optarg, "offset");
        break;
      case 'q':
        break;  // qemu-img 7.2 bench prints its report even with -q

      case 's':
        o.bufsize = parse_size_arg(optarg, "buffer size");
        if (o.bufsize > INT_MAX) {
          throw UsageError(fmt::format("Invalid buffer size specified{}", kSizeHint));
        }
        break;
      case 'S':
        o.step = parse_size_arg(optarg, "step_size");
        if (o.step > INT_MAX)
          throw UsageError(fmt::format("Invalid step_size specified{}", kSizeHint));
        break;
      case 't':
        o.cache = optarg;
        if (!valid_cache_mode(o.cache)) {
          throw UsageError("Invalid cache mode");
        }
        break;
      case 'w':
        o.write = true;
        break;
      case 'U':
        o.force_share = true;
        break;
      case kFlushInterval:
        if (!parse_count(optarg, o.flush_interval))
          throw UsageError("Invalid flush interval specified");
        break;
      case kNoDrain:
        o.drain_on_flush = false;
        break;
      case kPattern: {
        uint64_t p = 0;
        if (!parse_count(optarg, p) || p > 0xff) throw UsageError("Invalid pattern byte specified");
        o.pattern = int(p);
        break;
      }
      case 'h':
        print_usage();
        std::exit(0);
      case ':':
        throw UsageError(fmt::format("option requires an argument -- '{}'", char(optopt)));
      default:
        throw UsageError("Invalid option or missing argument for bench");
    }
  }
  if (argc - optind != 1) {
    throw UsageError("Expecting one image file name\nTry 'kiln-img --help' for more information");
  }
  o.file = argv[optind];
  if (o.flush_interval && !o.write) {
    throw UsageError("--flush-interval is only available in write tests");
  }
  if (o.flush_interval && o.flush_interval < o.depth) {
    throw UsageError("Flush interval can't be smaller than depth");
  }
  if (o.step == 0) o.step = o.bufsize;
  if (o.depth * o.bufsize > (64ull << 30)) {
    throw UsageError("Cannot allocate buffers: depth * buffer size is too large");
  }
  return o;
}

std::unique_ptr<block::BlockDevice> open_device(const BenchOptions& o) {
  const block::CacheMode cache = page_cache_mode(o.cache);
  const bool direct = cache == block::CacheMode::kNone;
  if (o.native_aio && !direct) {
    throw UsageError(fmt::format(
        "Could not open '{}': aio=native was specified, but it requires cache.direct=on, which "
        "was not specified.",
        o.file));
  }
  std::string format = o.fmt;
  try {
    if (format.empty()) {
      format = block::qcow2::probe_format(o.file);
      if (format == "raw" && o.write) {
        fmt::print(stderr,
                   "WARNING: Image format was not specified for '{}' and probing guessed raw.\n"
                   "         Automatically detecting the format is dangerous for raw images, "
                   "write operations on block 0 will be restricted.\n"
                   "         Specify the 'raw' format explicitly to remove the restrictions.\n",
                   o.file);
      }
    }
    if (format == "raw") {
      block::RawOptions ro;
      ro.read_only = !o.write;
      ro.cache = cache;
      ro.aio = o.aio == "threads" ? block::AioEngine::kThreads : block::AioEngine::kIoUring;
      ro.queue_depth = uint32_t(std::min<uint64_t>(std::max<uint64_t>(o.depth, 1), 4096));
      return block::open_raw(o.file, ro);
    }
    if (format != "qcow2") throw UsageError(fmt::format("Unknown file format '{}'", format));
    block::qcow2::OpenOptions qo;
    qo.read_only = !o.write;
    qo.force_share = o.force_share && !o.write;
    qo.cache = cache;
    qo.unsafe = o.cache == "unsafe";
    // One worker per request in flight (bounded): each runs one request synchronously.
    qo.workers = unsigned(std::min<uint64_t>(o.depth, 16));
    return block::qcow2::open_qcow2_device(o.file, qo);
  } catch (const UsageError&) {
    throw;
  } catch (const std::exception& e) {
    throw UsageError(fmt::format("Could not open '{}': {}", o.file, e.what()));
  }
}

// Buffers for the requests in flight, aligned for O_DIRECT.
class BufferPool {
 public:
  BufferPool(uint64_t slots, uint64_t size, int pattern) : size_(std::max<uint64_t>(size, 1)) {
    const uint64_t stride = (size_ + 4095) / 4096 * 4096;
    stride_ = stride;
    base_ = static_cast<uint8_t*>(std::aligned_alloc(4096, stride * slots));
    if (!base_) throw UsageError("Cannot allocate request buffers");
    std::memset(base_, pattern, stride * slots);
    for (uint64_t i = slots; i-- > 0;) free_.push_back(i);
  }
  ~BufferPool() { std::free(base_); }
  BufferPool(const BufferPool&) = delete;
  BufferPool& operator=(const BufferPool&) = delete;

  uint8_t* slot(uint64_t i) const { return base_ + i * stride_; }
  // Caller holds the bench mutex.
  uint64_t take() {
    const uint64_t i = free_.back();
    free_.pop_back();
    return i;
  }
  void give(uint64_t i) { free_.push_back(i); }

 private:
  uint64_t size_, stride_ = 0;
  uint8_t* base_ = nullptr;
  std::vector<uint64_t> free_;
};

// Keeps `depth` requests in flight. As in qemu-img bench, whoever completes a request issues
// the next one: a completion on the device's thread refills there, so the main thread sleeps
// until the end instead of being woken for every request. (Woken per request, it cost a
// context switch per 4 KiB read: about as much as the read.)
class Bench {
 public:
  Bench(const BenchOptions& o, block::BlockDevice& dev)
      : o_(o),
        dev_(dev),
        depth_(std::min(o.depth, std::max<uint64_t>(o.count, 1))),
        pool_(depth_, o.bufsize, o.pattern),
        size_(dev.size()),
        writethrough_(o.cache == "writethrough" || o.cache == "directsync"),
        offset_(o.offset) {}

  uint64_t max_in_flight() const { return max_in_flight_; }

  // Returns 0 or the first failure's -errno.
  int run() {
    std::unique_lock lock(mu_);
    refill(lock);
    done_cv_.wait(lock, [&] { return finished() && in_flight_ == 0; });
    return error_;
  }

 private:
  bool finished() const { return error_ != 0 || issued_ >= o_.count; }

  // Issues requests (and the flushes --flush-interval asks for) while there is room. One thread
  // at a time: a completion that arrives while another thread refills (or inline, inside
  // submit on this very thread) leaves its free slot to that thread's loop, so completions
  // never recurse into submissions.
  void refill(std::unique_lock<std::mutex>& lock) {
    if (refilling_) return;
    refilling_ = true;
    while (!finished()) {
      if (flush_due()) {
        // --flush-interval: with draining, the flush goes out alone and nothing follows it
        // until it completes; the last completion before it calls refill again.
        if ((o_.drain_on_flush && in_flight_ > 0) || in_flight_ >= depth_) break;
        flushed_at_ = issued_;
        flushing_ = o_.drain_on_flush;
        ++in_flight_;
        lock.unlock();
        dev_.flush([this](int r) { finish(r, kNoSlot, true); });
        lock.lock();
        continue;
      }
      if (flushing_ || in_flight_ >= depth_) break;
      const uint64_t slot = pool_.take();
      const uint64_t offset = offset_;
      offset_ = size_ == 0 ? 0 : (offset_ + o_.step) % size_;
      ++issued_;
      max_in_flight_ = std::max(max_in_flight_, ++in_flight_);
      lock.unlock();
      submit(offset, slot);
      lock.lock();
    }
    refilling_ = false;
    if (finished() && in_flight_ == 0) done_cv_.notify_all();
  }

  bool flush_due() const {
    return o_.flush_interval && issued_ > 0 && issued_ % o_.flush_interval == 0 &&
           flushed_at_ != issued_;
  }

  void submit(uint64_t offset, uint64_t slot) {
    if (offset > size_ || o_.bufsize > size_ - offset) {
      finish(-EIO, slot);  // QEMU refuses requests past the end with EIO
      return;
    }
    iovec iov{pool_.slot(slot), o_.bufsize};
    if (!o_.write) {
      dev_.read(offset, {&iov, 1}, [this, slot](int r) { finish(r, slot); });
    } else if (!writethrough_) {
      dev_.write(offset, {&iov, 1}, [this, slot](int r) { finish(r, slot); });
    } else {
      dev_.write(offset, {&iov, 1}, [this, slot](int r) {
        if (r < 0) return finish(r, slot);
        dev_.flush([this, slot](int r2) { finish(r2, slot); });
      });
    }
  }

  void finish(int result, uint64_t slot, bool flush = false) {
    std::unique_lock lock(mu_);
    if (result < 0 && error_ == 0) error_ = result;
    if (slot != kNoSlot) pool_.give(slot);
    if (flush) flushing_ = false;
    --in_flight_;
    refill(lock);
  }

  static constexpr uint64_t kNoSlot = UINT64_MAX;
  const BenchOptions& o_;
  block::BlockDevice& dev_;
  const uint64_t depth_;
  BufferPool pool_;
  const uint64_t size_;
  const bool writethrough_;
  std::mutex mu_;
  std::condition_variable done_cv_;
  uint64_t offset_;  // of the next request
  uint64_t issued_ = 0, in_flight_ = 0, max_in_flight_ = 0;
  uint64_t flushed_at_ = 0;  // issued_ when the last --flush-interval flush went out
  bool flushing_ = false;    // a draining flush is in flight: issue nothing until it is done
  bool refilling_ = false;
  int error_ = 0;
};

}  // namespace

int cmd_bench(int argc, char** argv) {
  const BenchOptions o = parse_args(argc, argv);
  auto dev = open_device(o);
  fmt::print(
      "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size "
      "{})\n",
      o.count, o.write ? "write" : "read", o.bufsize, o.depth, o.offset, o.step);
  if (o.flush_interval) fmt::print("Sending flush every {} requests\n", o.flush_interval);
  std::fflush(stdout);
  const auto start = std::chrono::steady_clock::now();
  Bench bench(o, *dev);
  const int result = bench.run();
  if (result < 0) {
    fmt::print(stderr, "kiln-img: Failed request: {}\n", std::strerror(-result));
    return 1;
  }
  dev->drain();
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  fmt::print("Run completed in {:.3f} seconds.\n", secs);
  // Test hook: how many requests were really outstanding at once.
  if (std::getenv("KILN_IMG_BENCH_STATS")) {
    fmt::print(stderr, "max in flight: {}\n", bench.max_in_flight());
  }
  return 0;
}

}  // namespace kiln::img
