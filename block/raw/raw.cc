// The raw driver proper: opening the image, checking requests, and the O_DIRECT bounce paths.
#include "block/raw/raw.h"

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <system_error>
#include <vector>

#include "base/aligned_buffer.h"
#include "base/math.h"
#include "base/unique_fd.h"
#include "block/raw/io_engine.h"
#include "block/raw/range_serializer.h"

namespace kiln::block {
namespace {

using raw_internal::IoEngine;
using raw_internal::IoOp;
using raw_internal::RangeSerializer;

constexpr uint32_t kDefaultQueueDepth = 128;
constexpr uint32_t kMaxQueueDepth = 4096;
// Plenty of threads to keep a disk busy when they block in preadv; the rest queue.
constexpr uint32_t kMaxPoolThreads = 16;
// Largest piece written at once when zeroes have to be written out.
constexpr uint64_t kZeroChunk = 1 << 20;

// Shared source for writing zeroes; aligned for any O_DIRECT device.
alignas(4096) unsigned char g_zeroes[kZeroChunk];

uint64_t total_length(std::span<const iovec> iov) {
  uint64_t total = 0;
  for (const iovec& entry : iov) total += entry.iov_len;
  return total;
}

void copy_to_iov(const std::vector<iovec>& iov, const unsigned char* source) {
  for (const iovec& entry : iov) {
    if (entry.iov_len == 0) continue;
    std::memcpy(entry.iov_base, source, entry.iov_len);
    source += entry.iov_len;
  }
}

void copy_from_iov(unsigned char* destination, const std::vector<iovec>& iov) {
  for (const iovec& entry : iov) {
    if (entry.iov_len == 0) continue;
    std::memcpy(destination, entry.iov_base, entry.iov_len);
    destination += entry.iov_len;
  }
}

// Errors that mean "this way of doing it is not available here", as opposed to an I/O error.
bool is_unsupported(int result) {
  return result == -EOPNOTSUPP || result == -ENOSYS || result == -ENOTTY || result == -EINVAL;
}

struct Geometry {
  uint64_t size = 0;
  bool block_device = false;
  uint32_t block_size = 512;  // logical block size of a block device
  uint32_t alignment = 1;     // > 1 only under O_DIRECT
};

class RawDevice final : public RawBlockDevice {
 public:
  RawDevice(UniqueFd fd, const Geometry& geometry, bool read_only, std::unique_ptr<IoEngine> engine)
      : fd_(std::move(fd)),
        geometry_(geometry),
        read_only_(read_only),
        engine_(std::move(engine)) {}

  ~RawDevice() override {
    drain();
    engine_.reset();  // joins the engine's threads before the fd closes
  }

  uint64_t size() const override { return geometry_.size; }
  bool read_only() const override { return read_only_; }
  uint32_t alignment() const override { return geometry_.alignment; }
  AioEngine engine() const override { return engine_->kind(); }
  bool is_block_device() const override { return geometry_.block_device; }

  BlockStatus block_status(uint64_t offset, uint64_t length) const override {
    if (offset >= geometry_.size || length == 0) return {true, 0};
    length = std::min(length, geometry_.size - offset);
    if (geometry_.block_device) return {true, length};
    return kiln::block::block_status(fd_.get(), offset, length);
  }

  void read(uint64_t offset, std::span<const iovec> iov, Completion done) override {
    Completion finish = track(std::move(done));
    const uint64_t length = total_length(iov);
    if (const int error = check_range(offset, length); error != 0 || length == 0) {
      return post(error, std::move(finish));
    }
    std::vector<iovec> vectors(iov.begin(), iov.end());
    if (is_aligned(offset, length, vectors)) {
      engine_->submit(IoOp::read(fd_.get(), offset, std::move(vectors), geometry_.alignment,
                                 std::move(finish)));
    } else {
      bounce_read(offset, length, std::move(vectors), std::move(finish));
    }
  }

  void write(uint64_t offset, std::span<const iovec> iov, Completion done) override {
    Completion finish = track(std::move(done));
    const uint64_t length = total_length(iov);
    if (const int error = check_writable_range(offset, length); error != 0 || length == 0) {
      return post(error, std::move(finish));
    }
    std::vector<iovec> vectors(iov.begin(), iov.end());
    const bool exclusive = !is_aligned(offset, length, vectors);
    serialise(offset, length, exclusive, std::move(finish),
              [this, offset, length, vectors = std::move(vectors)](Completion body_done) mutable {
                write_unserialised(offset, length, std::move(vectors), std::move(body_done));
              });
  }

  void flush(Completion done) override {
    engine_->submit(IoOp::data_sync(fd_.get(), track(std::move(done))));
  }

  void discard(uint64_t offset, uint64_t length, Completion done) override {
    Completion finish = track(std::move(done));
    if (const int error = check_writable_range(offset, length); error != 0 || length == 0) {
      return post(error, std::move(finish));
    }
    serialise(offset, length, false, std::move(finish),
              [this, offset, length](Completion body_done) {
                discard_unserialised(offset, length, std::move(body_done));
              });
  }

  void write_zeroes(uint64_t offset, uint64_t length, bool may_unmap, Completion done) override {
    Completion finish = track(std::move(done));
    if (const int error = check_writable_range(offset, length); error != 0 || length == 0) {
      return post(error, std::move(finish));
    }
    // Falling back to writing zeroes may need read-modify-write of the partial blocks.
    const bool exclusive = !is_aligned(offset, length, {});
    serialise(offset, length, exclusive, std::move(finish),
              [this, offset, length, may_unmap](Completion body_done) {
                write_zeroes_unserialised(offset, length, may_unmap, std::move(body_done));
              });
  }

  void drain() override {
    std::unique_lock lock(mutex_);
    idle_.wait(lock, [this] { return in_flight_ == 0; });
  }

 private:
  // Counts the request until its completion has returned, which is what drain() waits for.
  Completion track(Completion done) {
    {
      std::lock_guard lock(mutex_);
      ++in_flight_;
    }
    return [this, done = std::move(done)](int result) {
      if (done) done(result);
      std::lock_guard lock(mutex_);
      if (--in_flight_ == 0) idle_.notify_all();
    };
  }

  // Delivers a result known at submission through the engine, so it arrives like any other.
  void post(int result, Completion done) { engine_->submit(IoOp::nop(result, std::move(done))); }

  int check_range(uint64_t offset, uint64_t length) const {
    if (offset > geometry_.size || length > geometry_.size - offset) return -EINVAL;
    return 0;
  }

  int check_writable_range(uint64_t offset, uint64_t length) const {
    return read_only_ ? -EROFS : check_range(offset, length);
  }

  bool is_aligned(uint64_t offset, uint64_t length, const std::vector<iovec>& iov) const {
    const uint64_t alignment = geometry_.alignment;
    if (alignment == 1) return true;
    if (offset % alignment != 0 || length % alignment != 0) return false;
    return std::all_of(iov.begin(), iov.end(), [alignment](const iovec& entry) {
      return reinterpret_cast<uintptr_t>(entry.iov_base) % alignment == 0 &&
             entry.iov_len % alignment == 0;
    });
  }

  // Runs `body` once no earlier overlapping request forbids it (see RangeSerializer); only
  // O_DIRECT has read-modify-write, so buffered I/O skips the bookkeeping.
  void serialise(uint64_t offset, uint64_t length, bool exclusive, Completion finish,
                 std::function<void(Completion)> body) {
    if (geometry_.alignment == 1) return body(std::move(finish));
    const uint64_t begin = round_down(offset, geometry_.alignment);
    const uint64_t end = round_up(offset + length, geometry_.alignment);
    serializer_.acquire(
        begin, end, exclusive,
        [this, finish = std::move(finish), body = std::move(body)](RangeSerializer::Ticket ticket) {
          body([this, ticket, finish](int result) {
            serializer_.release(ticket);
            finish(result);
          });
        });
  }

  void write_unserialised(uint64_t offset, uint64_t length, std::vector<iovec> iov,
                          Completion done) {
    if (is_aligned(offset, length, iov)) {
      engine_->submit(IoOp::write(fd_.get(), offset, std::move(iov), std::move(done)));
    } else {
      read_modify_write(offset, length, std::move(iov), std::move(done));
    }
  }

  // Reads the aligned span around the request into an aligned buffer and copies the asked part.
  void bounce_read(uint64_t offset, uint64_t length, std::vector<iovec> iov, Completion done) {
    const uint64_t begin = round_down(offset, geometry_.alignment);
    const uint64_t end = round_up(offset + length, geometry_.alignment);
    auto buffer = std::make_shared<AlignedBuffer>(end - begin, geometry_.alignment, std::nothrow);
    if (buffer->data() == nullptr) return post(-ENOMEM, std::move(done));
    std::vector<iovec> span{{buffer->data(), end - begin}};
    engine_->submit(IoOp::read(
        fd_.get(), begin, std::move(span), geometry_.alignment,
        [buffer, iov = std::move(iov), skip = offset - begin, done = std::move(done)](int result) {
          if (result == 0) copy_to_iov(iov, buffer->data() + skip);
          done(result);
        }));
  }

  // Unaligned O_DIRECT write: read the partly covered first and last blocks, merge the new
  // bytes in, write the whole aligned span. The caller holds the span exclusively.
  void read_modify_write(uint64_t offset, uint64_t length, std::vector<iovec> iov,
                         Completion done) {
    const uint64_t alignment = geometry_.alignment;
    const uint64_t begin = round_down(offset, alignment);
    const uint64_t end = round_up(offset + length, alignment);
    auto buffer = std::make_shared<AlignedBuffer>(end - begin, alignment, std::nothrow);
    if (buffer->data() == nullptr) return post(-ENOMEM, std::move(done));

    std::vector<uint64_t> partial_blocks;
    if (offset != begin) partial_blocks.push_back(begin);
    if (offset + length != end && (partial_blocks.empty() || end - alignment != begin)) {
      partial_blocks.push_back(end - alignment);
    }

    auto write_span = [this, buffer, begin, end, skip = offset - begin, iov = std::move(iov),
                       done](int read_result) {
      if (read_result != 0) return done(read_result);
      copy_from_iov(buffer->data() + skip, iov);
      std::vector<iovec> span{{buffer->data(), end - begin}};
      engine_->submit(IoOp::write(fd_.get(), begin, std::move(span),
                                  [buffer, done](int result) { done(result); }));
    };
    if (partial_blocks.empty()) return write_span(0);

    struct Gather {
      std::atomic<size_t> pending;
      std::atomic<int> error{0};
    };
    auto gather = std::make_shared<Gather>();
    gather->pending = partial_blocks.size();
    for (uint64_t block : partial_blocks) {
      std::vector<iovec> piece{{buffer->data() + (block - begin), alignment}};
      engine_->submit(IoOp::read(fd_.get(), block, std::move(piece), geometry_.alignment,
                                 [gather, write_span](int result) {
                                   if (result != 0) gather->error = result;
                                   if (--gather->pending == 0) write_span(gather->error);
                                 }));
    }
  }

  void discard_unserialised(uint64_t offset, uint64_t length, Completion done) {
    // A discard is a hint: where the host cannot do it, doing nothing is a correct answer.
    auto hint_done = [done = std::move(done)](int result) {
      done(is_unsupported(result) ? 0 : result);
    };
    if (geometry_.block_device) {
      const uint64_t begin = round_up(offset, geometry_.block_size);
      const uint64_t end = round_down(offset + length, geometry_.block_size);
      if (begin >= end) return post(0, std::move(hint_done));
      engine_->submit(IoOp::discard_ioctl(fd_.get(), begin, end - begin, std::move(hint_done)));
      return;
    }
    engine_->submit(IoOp::fallocate(fd_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset,
                                    length, std::move(hint_done)));
  }

  // ZERO_RANGE first (allocated zeroes, what a guest asking without unmap expects); then a hole
  // if unmapping is allowed; then, as the way that always works, writing zeroes.
  void write_zeroes_unserialised(uint64_t offset, uint64_t length, bool may_unmap,
                                 Completion done) {
    auto after_zero_range = [this, offset, length, may_unmap, done](int result) {
      if (!is_unsupported(result)) return done(result);
      if (!may_unmap) return write_zero_chunks(offset, length, done);
      engine_->submit(IoOp::fallocate(fd_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset,
                                      length, [this, offset, length, done](int punch_result) {
                                        if (!is_unsupported(punch_result))
                                          return done(punch_result);
                                        write_zero_chunks(offset, length, done);
                                      }));
    };
    engine_->submit(IoOp::fallocate(fd_.get(), FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset,
                                    length, std::move(after_zero_range)));
  }

  // One chunk after the other, each started from the previous one's completion.
  void write_zero_chunks(uint64_t offset, uint64_t length, Completion done) {
    const uint64_t chunk = std::min(length, kZeroChunk);
    write_unserialised(offset, chunk, {{g_zeroes, chunk}},
                       [this, offset, length, chunk, done](int result) {
                         if (result != 0 || chunk == length) return done(result);
                         write_zero_chunks(offset + chunk, length - chunk, done);
                       });
  }

  UniqueFd fd_;
  const Geometry geometry_;
  const bool read_only_;
  RangeSerializer serializer_;
  std::mutex mutex_;
  std::condition_variable idle_;
  uint64_t in_flight_ = 0;
  std::unique_ptr<IoEngine> engine_;  // last: destroyed (threads joined) first
};

[[noreturn]] void fail(int error, const std::string& path, const std::string& why) {
  throw std::system_error(error, std::generic_category(), "raw image '" + path + "': " + why);
}

const char* kODirectHint =
    "the file system does not support O_DIRECT (cache=none); tmpfs is one such. Use "
    "cache=writeback, or put the image on a disk-backed file system";

UniqueFd open_image(const std::string& path, const RawOptions& options) {
  int flags = (options.read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC;
  if (options.cache == CacheMode::kNone) flags |= O_DIRECT;
  UniqueFd fd(::open(path.c_str(), flags));
  if (fd) return fd;
  const int error = errno;
  switch (error) {
    case ENOENT:
      fail(error, path, "cannot open: the file does not exist");
    case EACCES:
    case EPERM:
      fail(error, path,
           options.read_only
               ? "cannot open for reading: permission denied"
               : "cannot open for writing: permission denied (open it read-only if the guest "
                 "does not need to write)");
    case EISDIR:
      fail(error, path, "is a directory, not a disk image");
    case EROFS:
      fail(error, path, "cannot open for writing: the file system is read-only");
    case EINVAL:
      if (options.cache == CacheMode::kNone) fail(error, path, kODirectHint);
      break;
    default:
      break;
  }
  fail(error, path, "cannot open");
}

// Tries O_DIRECT reads of growing sizes from offset 0: the smallest the kernel accepts.
uint32_t probe_direct_alignment(int fd, const std::string& path) {
  AlignedBuffer buffer(4096, 4096);
  for (uint32_t size : {512u, 1024u, 2048u, 4096u}) {
    if (::pread(fd, buffer.data(), size, 0) >= 0) return size;
    if (errno != EINVAL) return 4096;  // some other trouble; the largest size is always safe
  }
  fail(EINVAL, path, kODirectHint);
}

uint32_t file_direct_alignment(int fd, const std::string& path) {
  struct statx info {};
  if (::statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &info) == 0 &&
      (info.stx_mask & STATX_DIOALIGN) != 0) {
    if (info.stx_dio_offset_align == 0) fail(EINVAL, path, kODirectHint);
    const uint32_t alignment = std::max(info.stx_dio_offset_align, info.stx_dio_mem_align);
    // Confirm with a real read: some file systems accept the open and refuse the I/O.
    AlignedBuffer buffer(alignment, alignment);
    if (::pread(fd, buffer.data(), alignment, 0) < 0 && errno == EINVAL) {
      fail(EINVAL, path, kODirectHint);
    }
    return alignment;
  }
  return probe_direct_alignment(fd, path);
}

Geometry describe(int fd, const std::string& path, const RawOptions& options) {
  struct stat info {};
  if (::fstat(fd, &info) != 0) fail(errno, path, "cannot stat");
  Geometry geometry;
  if (S_ISDIR(info.st_mode)) fail(EISDIR, path, "is a directory, not a disk image");
  if (S_ISBLK(info.st_mode)) {
    geometry.block_device = true;
    if (::ioctl(fd, BLKGETSIZE64, &geometry.size) != 0) {
      fail(errno, path, "cannot read the block device's size");
    }
    int logical_block = 0;
    if (::ioctl(fd, BLKSSZGET, &logical_block) == 0 && logical_block > 0) {
      geometry.block_size = static_cast<uint32_t>(logical_block);
    }
    if (options.cache == CacheMode::kNone) geometry.alignment = geometry.block_size;
    return geometry;
  }
  if (!S_ISREG(info.st_mode)) fail(EINVAL, path, "is neither a regular file nor a block device");
  geometry.size = static_cast<uint64_t>(info.st_size);
  if (options.cache == CacheMode::kNone) geometry.alignment = file_direct_alignment(fd, path);
  return geometry;
}

std::unique_ptr<IoEngine> make_engine(const RawOptions& options) {
  uint32_t depth = options.queue_depth == 0 ? kDefaultQueueDepth : options.queue_depth;
  depth = std::min(depth, kMaxQueueDepth);
  if (options.aio == AioEngine::kIoUring) {
    int error = 0;
    auto engine = raw_internal::make_uring_engine(depth, options.inject_uring_init_error, &error);
    if (engine) return engine;
    // No io_uring here (old kernel, seccomp, io_uring_disabled): threads do the same job.
  }
  return raw_internal::make_thread_engine(std::min(depth, kMaxPoolThreads));
}

}  // namespace

BlockStatus block_status(int fd, uint64_t offset, uint64_t length) {
  if (length == 0) return {true, 0};
  const off_t data = ::lseek(fd, static_cast<off_t>(offset), SEEK_DATA);
  if (data < 0) {
    // ENXIO: no data at or after offset (a trailing hole, or past the end of the file).
    return {errno != ENXIO, length};
  }
  const auto data_start = static_cast<uint64_t>(data);
  if (data_start > offset) return {false, std::min(data_start - offset, length)};
  const off_t hole = ::lseek(fd, static_cast<off_t>(offset), SEEK_HOLE);
  if (hole < 0 || static_cast<uint64_t>(hole) <= offset) return {true, length};
  return {true, std::min(static_cast<uint64_t>(hole) - offset, length)};
}

std::unique_ptr<RawBlockDevice> open_raw_device(const std::string& path,
                                                const RawOptions& options) {
  UniqueFd fd = open_image(path, options);
  const Geometry geometry = describe(fd.get(), path, options);
  return std::make_unique<RawDevice>(std::move(fd), geometry, options.read_only,
                                     make_engine(options));
}

std::unique_ptr<BlockDevice> open_raw(const std::string& path, const RawOptions& options) {
  return open_raw_device(path, options);
}

}  // namespace kiln::block
