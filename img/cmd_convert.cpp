// kiln-img convert: copies the guest-visible contents of any image (whole chain) into a new raw
// or qcow2 image, skipping zero ranges so the target stays sparse.
//
// Pipeline: -m reader threads take 1 MiB chunks in turn, read them (several preads in flight),
// find the zero clusters and, for -c, compress; one writer (this thread) applies the chunks in
// guest order, so a qcow2 target allocates its clusters in guest-offset order as qemu-img's
// does. With -W and a raw target the readers write their chunks themselves: order does not
// matter for a raw file.
#include <fcntl.h>
#include <fmt/format.h>
#include <getopt.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <thread>

#include "base/aligned_buffer.h"
#include "base/math.h"
#include "base/spin.h"
#include "img/common.h"

namespace kiln::img {
namespace {

using block::qcow2::Image;
using block::qcow2::RawImage;
using block::qcow2::SyncImage;

constexpr int kMaxCoroutines = 16;  // qemu-img's limit for -m

// glibc's vectorised memcmp against the buffer shifted by 16 bytes beats a byte loop by far:
// once the first 16 bytes are zero, b[i] == b[i + 16] everywhere means all of it is.
bool all_zero(std::span<const uint8_t> b) {
  const size_t head = std::min<size_t>(b.size(), 16);
  for (size_t i = 0; i < head; ++i) {
    if (b[i] != 0) return false;
  }
  return b.size() <= 16 || std::memcmp(b.data(), b.data() + 16, b.size() - 16) == 0;
}

// True when the whole range reads as zeros without reading it.
bool known_zero(SyncImage& src, uint64_t offset, uint64_t length) {
  while (length > 0) {
    const ChainStatus s = chain_status(src, offset, length);
    if (s.data || s.length == 0) return false;
    offset += s.length;
    length -= std::min(length, s.length);
  }
  return true;
}

struct Options {
  std::string src_fmt, out_fmt = "raw", options, backing, backing_fmt;
  std::string cache = "unsafe";         // -t: qemu-img convert's default for the target
  std::string src_cache = "writeback";  // -T
  bool compress = false, progress = false, force_share = false, out_of_order = false;
  bool no_create = false;  // -n: write into an existing target
  int coroutines = 8;      // qemu-img's default number of parallel requests
  // -S: zero runs at least this long are left out of the target; 0 writes every byte (the
  // target is fully allocated). qemu-img's default is 4 KiB.
  uint64_t sparse_size = 4096;
};

// What the writer does with one piece of a chunk.
struct Run {
  enum Kind { kData, kZero, kCompressed } kind;
  uint64_t start, length;  // within the chunk
  std::vector<uint8_t> compressed;
};

struct Chunk {
  uint64_t pos = 0;
  AlignedBuffer buffer;           // chunk-sized, reused; aligned for O_DIRECT (-t/-T none)
  std::span<const uint8_t> data;  // the part of buffer read; empty when nothing is to write
  std::vector<Run> runs;
};

struct Target {
  std::unique_ptr<Image> qcow2;
  std::unique_ptr<RawImage> raw;
  bool compress = false;
  bool sync = false;
  // A new target reads as zeros; an existing one (-n) must be told where zeros go.
  bool zero_init = true;

  uint64_t granularity() const { return qcow2 ? qcow2->cluster_size() : 4096; }
  // The chain under a new qcow2 target (-B), whose contents the target need not repeat. An
  // existing target may hold anything over its backing: every cluster is written.
  SyncImage* backing() const { return qcow2 && zero_init ? qcow2->backing() : nullptr; }

  void apply(const Chunk& c) {
    for (const Run& r : c.runs) {
      const uint64_t offset = c.pos + r.start;
      if (r.kind == Run::kZero) {
        write_zeroes(offset, r.length);
        continue;
      }
      const auto data = c.data.subspan(r.start, r.length);
      if (!qcow2) {
        raw->write(offset, data);
      } else if (r.kind == Run::kCompressed) {
        qcow2->write_compressed(offset, data, r.compressed);
      } else {
        qcow2->write(offset, data);
      }
    }
  }
  void write_zeroes(uint64_t offset, uint64_t length) {
    if (qcow2) {
      qcow2->write_zeroes(offset, length, true);  // as qemu-img: BDRV_REQ_MAY_UNMAP
      return;
    }
    // A raw target gets a hole where it can (only -n targets come here), zeros otherwise.
    if (::fallocate(raw->fd(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off_t(offset),
                    off_t(length)) == 0) {
      return;
    }
    static const std::vector<uint8_t> zeros(1 << 20);
    for (uint64_t done = 0; done < length;) {
      const uint64_t n = std::min<uint64_t>(zeros.size(), length - done);
      raw->write(offset + done, std::span(zeros).first(n));
      done += n;
    }
  }
  void flush() {
    if (qcow2) {
      qcow2->flush();
    } else if (sync) {
      raw->flush();
    }
  }
};

// Marks each piece of `gran` bytes that reads as zeros, then takes back the marks of zero runs
// shorter than `sparse_size` (-S) that lie between data: qemu-img writes those as data, while
// a chunk's leading and trailing zeros stay sparse whatever their length.
std::vector<bool> zero_pieces(std::span<const uint8_t> data, uint64_t gran, uint64_t sparse_size) {
  std::vector<bool> zero(div_round_up(data.size(), gran), false);
  if (sparse_size == 0) return zero;
  for (size_t i = 0; i < zero.size(); ++i) {
    zero[i] = all_zero(data.subspan(i * gran, std::min<uint64_t>(gran, data.size() - i * gran)));
  }
  for (size_t i = 0; i < zero.size();) {
    size_t end = i;
    while (end < zero.size() && zero[end]) ++end;
    const bool between_data = i > 0 && end < zero.size();
    if (end > i && between_data && (end - i) * gran < sparse_size) {
      std::fill(zero.begin() + ptrdiff_t(i), zero.begin() + ptrdiff_t(end), false);
    }
    i = std::max(end, i + 1);
  }
  return zero;
}

// Splits a chunk into target clusters: those that read as they must already (zeros, or what the
// backing file holds) are left out, neighbouring data clusters merge into one write, and with
// -c each full cluster is compressed here, on the reader's thread.
void plan_runs(Chunk& c, std::span<const uint8_t> below, uint64_t gran, const Target& dst,
               uint64_t sparse_size) {
  const auto data = c.data;
  // With -c every all-zero cluster stays out of the target, however short the zero run (-S 0
  // still writes them all): what qemu-img does, seen with 512-byte clusters and -S 4k.
  if (dst.compress && sparse_size != 0) sparse_size = std::min(sparse_size, gran);
  const std::vector<bool> zeros = zero_pieces(data, gran, sparse_size);
  for (uint64_t off = 0; off < data.size(); off += gran) {
    const auto piece = data.subspan(off, std::min(gran, data.size() - off));
    const bool zero = zeros[off / gran];
    const bool reads_right = below.empty()
                                 ? zero && dst.zero_init
                                 : std::memcmp(piece.data(), below.data() + off, piece.size()) == 0;
    if (reads_right) continue;  // the target reads this cluster right without writing it
    // (A piece shorter than a cluster is the image's last: compressed all the same.)
    const Run::Kind kind = zero ? Run::kZero : dst.compress ? Run::kCompressed : Run::kData;
    Run* last = c.runs.empty() ? nullptr : &c.runs.back();
    if (kind != Run::kCompressed && last && last->kind == kind &&
        last->start + last->length == off) {
      last->length += piece.size();
      continue;
    }
    Run r{kind, off, piece.size(), {}};
    if (kind == Run::kCompressed) r.compressed = dst.qcow2->compress(piece);
    c.runs.push_back(std::move(r));
  }
}

// A chunk's buffer, on transparent huge pages where the kernel allows (THP "madvise" mode, as
// Debian's default): the page cache copies into and out of it then miss the TLB 512 times less.
// Raw->qcow2 of a 2 GiB half-data image was measured 3-4% faster (10 interleaved runs, fastest
// half 0.188 s against 0.195 s). A 1 MiB chunk still takes a whole 2 MiB page: a few MiB more
// memory, for a window of a few chunks.
AlignedBuffer chunk_buffer(uint64_t chunk_size) {
  constexpr size_t kHugePage = 2u << 20;
  AlignedBuffer buffer(std::max<size_t>(chunk_size, kHugePage), kHugePage);
  ::madvise(buffer.data(), buffer.size(), MADV_HUGEPAGE);  // only a hint: failure is harmless
  return buffer;
}

// Reads chunk `index` into c.buffer and decides what to write for it.
void prepare_chunk(Chunk& c, SyncImage& src, const Target& dst, uint64_t index, uint64_t chunk_size,
                   uint64_t sparse_size) {
  c.pos = index * chunk_size;
  const uint64_t n = std::min(chunk_size, src.size() - c.pos);
  SyncImage* below = dst.backing();
  const bool below_zero = !below || known_zero(*below, c.pos, n);
  const bool src_zero = known_zero(src, c.pos, n);
  if (src_zero && below_zero && sparse_size != 0) {
    if (!dst.zero_init) c.runs.push_back({Run::kZero, 0, n, {}});
    return;
  }
  // Buffers are reused, not allocated per chunk: fresh memory costs a page fault per 4 KiB,
  // more than the copy out of the page cache.
  if (c.buffer.size() < chunk_size) c.buffer = chunk_buffer(chunk_size);
  const auto data = c.buffer.span().first(n);
  if (src_zero) {
    std::fill(data.begin(), data.end(), 0);
  } else {
    src.read(c.pos, data);
  }
  c.data = data;
  thread_local std::vector<uint8_t> below_data;
  below_data.resize(below_zero ? 0 : n);
  if (!below_zero) below->read(c.pos, below_data);
  plan_runs(c, below_data, dst.granularity(), dst, sparse_size);
}

// The reader threads and the in-order hand-over to the writer.
class Pipeline {
 public:
  Pipeline(SyncImage& src, Target& dst, const Options& o, uint64_t chunk_size)
      : src_(src),
        dst_(dst),
        chunk_size_(chunk_size),
        chunks_((src.size() + chunk_size - 1) / chunk_size),
        threads_(reader_threads(o.coroutines, o.compress)),
        window_(threads_ + 3),
        direct_(o.out_of_order && !dst.qcow2),
        spin_(threads_ < std::max(1u, std::thread::hardware_concurrency()) &&
              page_cache_mode(o.cache) == block::CacheMode::kWriteback &&
              page_cache_mode(o.src_cache) == block::CacheMode::kWriteback),
        sparse_size_(o.sparse_size) {
    for (unsigned i = 0; i < threads_; ++i) readers_.emplace_back([this] { read_loop(); });
  }
  ~Pipeline() {
    {
      std::lock_guard lock(mu_);
      stop_ = true;
      progress_.fetch_add(1, std::memory_order_relaxed);
    }
    space_.notify_all();
    for (auto& t : readers_) t.join();
  }

  uint64_t chunks() const { return chunks_; }

  // -m requests in flight, but no more threads than CPUs: reads of cached data and compression
  // are CPU work, and extra threads only add switches and stall the in-order writer when the
  // one holding the next chunk is descheduled. Without compression the writer's copies into
  // the target cost as much as the reads, so it keeps a CPU to itself (on 2 CPUs one reader
  // was measured 15-20% faster than two; with -c two readers win).
  static unsigned reader_threads(int requests, bool compress) {
    const unsigned cpus = std::max(1u, std::thread::hardware_concurrency());
    const unsigned usable = compress ? cpus : std::max(1u, cpus - 1);
    return std::min(unsigned(requests), usable);
  }

  // Writes chunk `index` once a reader has it; rethrows a reader's failure.
  void write_next(uint64_t index) {
    std::unique_lock lock(mu_);
    wait(lock, ready_cv_, [&] { return failure_ || ready_.count(index); });
    if (failure_) std::rethrow_exception(failure_);
    Chunk c = std::move(ready_.at(index));
    ready_.erase(index);
    lock.unlock();
    dst_.apply(c);
    lock.lock();
    written_ = index + 1;
    progress_.fetch_add(1, std::memory_order_relaxed);
    if (!c.data.empty()) release_buffer(std::move(c.buffer));
    space_.notify_one();  // one more chunk may be read
  }

 private:
  // Sleeping on a condition variable and being woken costs two context switches, and on a
  // 2-CPU host the faster of reader and writer slept once per chunk: 1300-1500 switches for a
  // 2 GiB image. So a waiter first watches progress_ with the lock released, for up to
  // kSpinTime: a bit more than one 1 MiB chunk takes to copy out of or into the page cache.
  // Measured with raw->qcow2 of a 2 GiB half-data image: 100 us still left 425 switches, 300 us
  // 21; the run got 5-10% faster. Only when each thread has a CPU to itself (a spinner must not
  // take the CPU of the thread it waits for) and both files go through the page cache (O_DIRECT
  // requests take milliseconds, so spinning would only burn a CPU).
  static constexpr auto kSpinTime = std::chrono::microseconds(300);

  template <typename Ready>
  void wait(std::unique_lock<std::mutex>& lock, std::condition_variable& cv, Ready ready) {
    const auto deadline = std::chrono::steady_clock::now() + kSpinTime;
    while (spin_ && !ready()) {
      const uint64_t seen = progress_.load(std::memory_order_relaxed);
      lock.unlock();
      const bool changed =
          spin_until([&] { return progress_.load(std::memory_order_relaxed) != seen; }, deadline);
      lock.lock();
      if (!changed) break;
    }
    cv.wait(lock, ready);
  }

  // Called under mu_.
  void release_buffer(AlignedBuffer buffer) {
    --buffers_out_;
    if (buffer.data() != nullptr) spare_.push_back(std::move(buffer));
  }

  void read_loop() {
    for (;;) {
      std::unique_lock lock(mu_);
      wait(lock, space_, [&] {
        return stop_ || failure_ || next_ >= chunks_ ||
               (buffers_out_ < window_ && next_ < written_ + kMaxAhead);
      });
      if (stop_ || failure_ || next_ >= chunks_) return;
      const uint64_t index = next_++;
      Chunk c;
      ++buffers_out_;  // until we know whether the chunk needs its buffer
      if (!spare_.empty()) {
        c.buffer = std::move(spare_.back());
        spare_.pop_back();
      }
      lock.unlock();
      try {
        prepare_chunk(c, src_, dst_, index, chunk_size_, sparse_size_);
        if (direct_) {
          dst_.apply(c);
          c.data = {};
          c.runs.clear();
        }
      } catch (...) {
        lock.lock();
        if (!failure_) failure_ = std::current_exception();
        progress_.fetch_add(1, std::memory_order_relaxed);
        space_.notify_all();
        ready_cv_.notify_all();
        return;
      }
      lock.lock();
      if (c.data.empty()) {  // nothing for the writer to copy: the buffer may serve another chunk
        release_buffer(std::move(c.buffer));
        space_.notify_one();
      }
      ready_.emplace(index, std::move(c));
      progress_.fetch_add(1, std::memory_order_relaxed);
      if (index == written_) ready_cv_.notify_one();  // the writer waits for no other
    }
  }

  SyncImage& src_;
  Target& dst_;
  const uint64_t chunk_size_, chunks_;
  const unsigned threads_;
  // Chunks that hold data read ahead of the writer, each in its own (reused) buffer. Readers and
  // writer run at about the same speed, but not evenly: with room for just one chunk per reader
  // besides the one being written, each stalled the other. Two more were measured 10% faster on
  // a 2-CPU host (raw->qcow2 of a 2 GiB half-data image, 12 interleaved runs: median 0.233 s,
  // 0.258 s before); more than that gained nothing.
  //
  // Chunks that turn out to be holes hold no buffer and do not count: when the window counted
  // them, a run of holes as long as the window (4 MiB in the bench image) let the reader finish
  // them and then wait until the writer had written every data chunk before them, while during
  // the next run of data the writer waited for the reader. Each thread spun 15% of the run.
  const uint64_t window_;
  // Any chunk, hole or not, is at most this far ahead of the writer: bounds the ready_ map.
  static constexpr uint64_t kMaxAhead = 1024;
  const bool direct_;
  const bool spin_;  // a waiter spins before it sleeps (see kSpinTime)
  const uint64_t sparse_size_;
  std::mutex mu_;
  std::condition_variable space_, ready_cv_;
  std::atomic<uint64_t> progress_{0};  // bumped under mu_ whenever a chunk is ready or written
  uint64_t next_ = 0, written_ = 0;
  uint64_t buffers_out_ = 0;  // chunks being read, or read and holding data for the writer
  bool stop_ = false;
  std::exception_ptr failure_;
  std::map<uint64_t, Chunk> ready_;
  std::vector<AlignedBuffer> spare_;  // buffers of chunks already written
  std::vector<std::thread> readers_;
};

// The unit the pipeline reads, scans and writes. 1 MiB chunks were measured faster than
// qemu-img's 2 MiB requests on a 2-CPU host, each tool writing a new file of a 1 GiB half-data
// image, 8 interleaved runs: medians raw->qcow2 0.13 s (2 MiB: 0.16 s) and qcow2->raw 0.12 s
// (2 MiB: 0.135 s); -c and -t none were no slower. Presumably the reader's copy of a smaller
// chunk is still in the CPU's cache when the writer copies it into the target (not checked with
// cache counters). A chunk's edges matter only for -S larger than the target's cluster (its
// leading and trailing zeros stay sparse, see zero_pieces): then the chunk is qemu-img's request
// size, so short zero runs land as in its output.
uint64_t chunk_size(uint64_t granularity, uint64_t sparse_size) {
  const uint64_t preferred = sparse_size > granularity ? 2ull << 20 : 1ull << 20;
  return std::max(granularity, preferred);
}

// -S as qemu-img 7.2 takes it: a size with the usual suffixes, a multiple of 512, at most 16 MiB.
uint64_t parse_sparse_size(const char* text) {
  uint64_t size;
  try {
    size = block::qcow2::parse_size(text);
  } catch (const std::exception&) {
    throw UsageError(
        "Invalid buffer size for sparse output specified. You may use k, M, G, T, P or E "
        "suffixes for\nkiln-img: kilobytes, megabytes, gigabytes, terabytes, petabytes and "
        "exabytes.");
  }
  if (size % 512 != 0 || size > (16u << 20)) {
    throw UsageError(
        "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up "
        "to 16777216. Select 0 to disable sparse detection (fully allocates output).");
  }
  return size;
}

Options parse_args(int argc, char** argv) {
  Options o;
  optind = 1;
  static const option kLong[] = {{"force-share", no_argument, nullptr, 'U'},
                                 {"help", no_argument, nullptr, 'h'},
                                 {nullptr, 0, nullptr, 0}};
  for (int c; (c = getopt_long(argc, argv, ":hf:O:o:B:F:cnpqUWt:T:m:S:", kLong, nullptr)) != -1;) {
    switch (c) {
      case 'f':
        o.src_fmt = optarg;
        break;
      case 'O':
        o.out_fmt = optarg;
        break;
      case 'o':
        o.options += (o.options.empty() ? "" : ",") + std::string(optarg);
        break;
      case 'B':
        o.backing = optarg;
        break;
      case 'F':
        o.backing_fmt = optarg;
        break;
      case 'c':
        o.compress = true;
        break;
      case 'n':
        o.no_create = true;
        break;
      case 'p':
        o.progress = true;
        break;
      case 'U':
        o.force_share = true;
        break;
      case 'q':
        o.progress = false;
        break;
      case 't':
        o.cache = optarg;
        break;
      case 'W':
        o.out_of_order = true;
        break;
      case 'm': {
        char* end = nullptr;
        const long n = std::strtol(optarg, &end, 10);
        if (*optarg == '\0' || *end != '\0' || n < 1 || n > kMaxCoroutines) {
          throw UsageError(fmt::format(
              "Invalid number of coroutines. Allowed number of coroutines is between 1 and {}",
              kMaxCoroutines));
        }
        o.coroutines = int(n);
        break;
      }
      case 'S':
        o.sparse_size = parse_sparse_size(optarg);
        break;
      case 'T':
        o.src_cache = optarg;
        break;
      default:
        throw UsageError("Invalid option or missing argument for convert");
    }
  }
  if (!valid_cache_mode(o.cache)) throw UsageError("Invalid cache option: " + o.cache);
  if (!valid_cache_mode(o.src_cache)) {
    throw UsageError("Invalid source cache option: " + o.src_cache);
  }
  if (argc - optind != 2) throw UsageError("Expecting a source and a target file name");
  return o;
}

// Creates and opens a qcow2 target, with its backing chain when -B / -o backing_file name one.
void open_qcow2_target(Target& dst, const Options& o, const std::string& path, uint64_t size) {
  block::qcow2::CreateOptions co;
  bool compat_given = false;
  apply_qcow2_options(parse_options(o.options), co, compat_given);
  if (!o.backing.empty()) co.backing_file = o.backing;
  if (!o.backing_fmt.empty()) co.backing_format = o.backing_fmt;
  // qemu-img 7.x never probes the format of a new image's backing file.
  if (!co.backing_file.empty() && co.backing_format.empty()) {
    throw UsageError("Use of backing file requires explicit backing format");
  }
  co.size = size;
  Image::create(path, co);
  block::qcow2::OpenOptions oo;
  oo.read_only = false;
  oo.format = "qcow2";
  oo.unsafe = !dst.sync;
  oo.cache = page_cache_mode(o.cache);
  try {
    dst.qcow2 = Image::open(path, oo);
  } catch (const std::exception& e) {
    // As qemu-img: the image is created, then opening it fails on the backing file.
    throw UsageError(
        fmt::format("Could not open '{}': Could not open backing file: {}", path, e.what()));
  }
}

// -n: the target exists already, in the -O format, and must hold the whole source.
void open_existing_target(Target& dst, const Options& o, const std::string& path, uint64_t size) {
  if (!o.options.empty()) throw UsageError("-o has no effect when skipping image creation");
  if (o.out_fmt != "qcow2" && o.out_fmt != "raw") {
    throw UsageError(fmt::format("Unknown file format '{}'", o.out_fmt));
  }
  try {
    if (o.out_fmt == "qcow2") {
      block::qcow2::OpenOptions oo;
      oo.read_only = false;
      oo.format = "qcow2";
      oo.unsafe = !dst.sync;
      oo.cache = page_cache_mode(o.cache);
      dst.qcow2 = Image::open(path, oo);
    } else {
      dst.raw = RawImage::open(path, false, false, page_cache_mode(o.cache));
    }
  } catch (const std::exception& e) {
    throw UsageError(fmt::format("Could not open '{}': {}", path, e.what()));
  }
  dst.zero_init = false;
  const uint64_t target_size = dst.qcow2 ? dst.qcow2->size() : dst.raw->size();
  if (target_size < size) throw UsageError("output file is smaller than input file");
}

void print_progress(uint64_t done, uint64_t size, int& last_percent) {
  const int percent = size ? int(done * 10000 / size) : 10000;
  if (percent == last_percent) return;
  std::printf("    (%.2f/100%%)\r", percent / 100.0);
  std::fflush(stdout);
  last_percent = percent;
}

}  // namespace

int cmd_convert(int argc, char** argv) {
  const Options o = parse_args(argc, argv);
  const std::string src_path = argv[optind], dst_path = argv[optind + 1];
  if (!o.backing.empty() && o.out_fmt == "raw") {
    throw UsageError("Backing file not supported for file format 'raw'");
  }
  if (o.compress && o.out_fmt != "qcow2")
    throw UsageError("Compression not supported for this file format");
  auto src_options = read_options(o.src_fmt, o.force_share);
  src_options.cache = page_cache_mode(o.src_cache);
  auto src = block::qcow2::open_image(src_path, src_options);
  const uint64_t size = src->size();

  Target dst;
  dst.compress = o.compress;
  dst.sync = o.cache != "unsafe";
  if (o.no_create) {
    open_existing_target(dst, o, dst_path, size);
  } else if (o.out_fmt == "qcow2") {
    open_qcow2_target(dst, o, dst_path, size);
  } else if (o.out_fmt == "raw") {
    const auto opts = parse_options(o.options);
    if (!opts.empty()) throw UsageError(fmt::format("Invalid parameter '{}'", opts.begin()->first));
    RawImage::create(dst_path, size);
    dst.raw = RawImage::open(dst_path, false, false, page_cache_mode(o.cache));
  } else {
    throw UsageError(fmt::format("Unknown file format '{}'", o.out_fmt));
  }

  const uint64_t chunk = chunk_size(dst.granularity(), o.sparse_size);
  int last_percent = -1;
  {
    Pipeline pipeline(*src, dst, o, chunk);
    for (uint64_t i = 0; i < pipeline.chunks(); ++i) {
      pipeline.write_next(i);
      if (o.progress) print_progress(std::min(size, (i + 1) * chunk), size, last_percent);
    }
  }
  if (dst.compress) dst.qcow2->align_file_end_to_sector();
  dst.flush();
  if (o.progress) std::printf("    (100.00/100%%)\n");
  return 0;
}

}  // namespace kiln::img
