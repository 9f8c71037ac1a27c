// Keeps writes that must not interleave in submission order. Under O_DIRECT an unaligned write
// is a read-modify-write of whole blocks: a write landing on those blocks between the read and
// the write would be silently undone. Such "exclusive" ranges therefore wait for every earlier
// overlapping write, and every later overlapping write waits for them. Plain aligned writes do
// not wait for each other (the guest orders those itself). Never blocks a thread: a request
// that must wait is started later, by the release() that unblocks it. Internal to block/raw.
#pragma once

#include <cstdint>
#include <functional>
#include <list>
#include <mutex>

namespace kiln::block::raw_internal {

class RangeSerializer {
 public:
  struct Entry {
    uint64_t begin;
    uint64_t end;  // exclusive
    bool exclusive;
    bool running;
    std::function<void(std::list<Entry>::iterator)> start;
  };
  using Ticket = std::list<Entry>::iterator;
  using StartFn = std::function<void(Ticket)>;

  // Registers [begin, end) and calls `start(ticket)` now (on this thread) or later from the
  // release() that unblocks it. The request releases its ticket exactly once when it is done.
  void acquire(uint64_t begin, uint64_t end, bool exclusive, StartFn start);
  void release(Ticket ticket);

  size_t size() const;

 private:
  static bool conflicts(const Entry& a, const Entry& b);
  bool blocked_by_earlier(Ticket ticket) const;

  mutable std::mutex mutex_;
  std::list<Entry> entries_;  // submission order
};

}  // namespace kiln::block::raw_internal
