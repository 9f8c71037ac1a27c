#include "block/raw/range_serializer.h"

#include <utility>
#include <vector>

namespace kiln::block::raw_internal {

bool RangeSerializer::conflicts(const Entry& a, const Entry& b) {
  const bool overlap = a.begin < b.end && b.begin < a.end;
  return overlap && (a.exclusive || b.exclusive);
}

bool RangeSerializer::blocked_by_earlier(Ticket ticket) const {
  for (auto it = entries_.begin(); it != ticket; ++it) {
    if (conflicts(*it, *ticket)) return true;
  }
  return false;
}

void RangeSerializer::acquire(uint64_t begin, uint64_t end, bool exclusive, StartFn start) {
  Ticket ticket;
  bool run_now;
  {
    std::lock_guard lock(mutex_);
    ticket = entries_.insert(entries_.end(), Entry{begin, end, exclusive, false, {}});
    run_now = !blocked_by_earlier(ticket);
    if (run_now) {
      ticket->running = true;
    } else {
      ticket->start = std::move(start);
    }
  }
  if (run_now) start(ticket);
}

void RangeSerializer::release(Ticket ticket) {
  std::vector<std::pair<Ticket, StartFn>> ready;
  {
    std::lock_guard lock(mutex_);
    entries_.erase(ticket);
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (it->running || blocked_by_earlier(it)) continue;
      it->running = true;
      ready.emplace_back(it, std::move(it->start));
    }
  }
  // Outside the lock: starting may complete synchronously and release again.
  for (auto& [waiting, start] : ready) start(waiting);
}

size_t RangeSerializer::size() const {
  std::lock_guard lock(mutex_);
  return entries_.size();
}

}  // namespace kiln::block::raw_internal
