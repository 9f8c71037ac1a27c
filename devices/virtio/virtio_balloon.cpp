#include "devices/virtio/virtio_balloon.h"

#include <fmt/format.h>

#include <algorithm>
#include <ctime>
#include <stdexcept>
#include <vector>

namespace kiln::devices::virtio {
namespace {

constexpr uint64_t kPageSize = 1ull << kBalloonPageShift;

uint32_t load_le32(const uint8_t* p) {
  return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
}

uint64_t load_le64(const uint8_t* p) {
  return uint64_t(load_le32(p)) | uint64_t(load_le32(p + 4)) << 32;
}

// Linux sends at most 256 page frames (1 KiB) per buffer and a few hundred bytes of
// statistics; a guest that sends more gets the first this-many bytes looked at.
constexpr size_t kMaxBufferBytes = 64 * 1024;

// What the driver put in the chain's device-readable buffers, concatenated (capped).
std::vector<uint8_t> readable_bytes(const DescriptorChain& chain) {
  std::vector<uint8_t> bytes;
  bytes.reserve(std::min<uint64_t>(chain.readable_bytes, kMaxBufferBytes));
  for (const Descriptor& d : chain.descriptors) {
    if (d.writable) continue;
    size_t take = std::min<size_t>(d.len, kMaxBufferBytes - bytes.size());
    bytes.insert(bytes.end(), d.host, d.host + take);
    if (bytes.size() == kMaxBufferBytes) break;
  }
  return bytes;
}

}  // namespace

void VirtioBalloon::read_config(uint64_t offset, std::span<uint8_t> data) {
  uint32_t fields[2] = {num_pages_.load(), actual_.load()};
  uint8_t image[kBalloonConfigSize];
  for (int f = 0; f < 2; ++f)
    for (int b = 0; b < 4; ++b) image[4 * f + b] = uint8_t(fields[f] >> (8 * b));
  for (size_t i = 0; i < data.size(); ++i)
    data[i] = offset + i < kBalloonConfigSize ? image[offset + i] : 0;
}

void VirtioBalloon::write_config(uint64_t offset, std::span<const uint8_t> data) {
  // Only `actual` (bytes 4-7) is the driver's to write; num_pages is the device's.
  uint32_t actual = actual_.load();
  for (size_t i = 0; i < data.size(); ++i) {
    uint64_t at = offset + i;
    if (at < 4 || at >= kBalloonConfigSize) continue;
    uint32_t shift = uint32_t(at - 4) * 8;
    actual = (actual & ~(0xFFu << shift)) | uint32_t(data[i]) << shift;
  }
  if (actual_.exchange(actual) != actual && actual_listener_) actual_listener_(actual_bytes());
}

bool VirtioBalloon::activate(const VirtioActivation& activation) {
  std::lock_guard lock(mutex_);
  if (activation.queues.size() != 3) return false;
  if (!activation.queues[kBalloonInflateQueue].ready() ||
      !activation.queues[kBalloonDeflateQueue].ready())
    return false;
  activation_ = activation;
  active_ = true;
  stats_head_.reset();
  return true;
}

void VirtioBalloon::reset() {
  std::lock_guard lock(mutex_);
  active_ = false;
  activation_ = {};
  stats_head_.reset();
  // Without a driver every page is the guest's again (a new driver starts from an empty
  // balloon), so the guest has all its RAM.
  actual_ = 0;
}

void VirtioBalloon::set_target(uint64_t guest_bytes) {
  uint64_t ram_pages = ram_bytes_ >> kBalloonPageShift;
  uint64_t keep = std::min(guest_bytes, ram_bytes_) >> kBalloonPageShift;
  num_pages_ = uint32_t(std::min<uint64_t>(ram_pages - keep, UINT32_MAX));
  std::lock_guard lock(mutex_);
  if (active_) activation_.interrupt->signal_config_change();
}

uint64_t VirtioBalloon::actual_bytes() const {
  uint64_t ballooned = uint64_t(actual_.load()) << kBalloonPageShift;
  return ram_bytes_ - std::min(ram_bytes_, ballooned);
}

void VirtioBalloon::process_queue(uint16_t index) {
  std::lock_guard lock(mutex_);
  if (!active_ || index >= activation_.queues.size()) return;
  Queue& queue = activation_.queues[index];
  if (!queue.ready()) return;
  if (index == kBalloonInflateQueue) inflate_locked(queue);
  if (index == kBalloonDeflateQueue) deflate_locked(queue);
  if (index == kBalloonStatsQueue) stats_locked(queue);
}

// Inflate and deflate buffers are arrays of le32 page frame numbers.
void VirtioBalloon::inflate_locked(Queue& queue) {
  const memory::GuestMemory& memory = *activation_.memory;
  bool used = false;
  do {
    DescriptorChain chain;
    Queue::PopStatus status;
    while ((status = queue.pop(memory, chain)) == Queue::PopStatus::kChain) {
      std::vector<uint8_t> bytes = readable_bytes(chain);
      std::vector<uint32_t> pfns;
      pfns.reserve(bytes.size() / 4);
      for (size_t i = 0; i + 4 <= bytes.size(); i += 4) pfns.push_back(load_le32(&bytes[i]));
      metrics_.inflated_pages += pfns.size();
      release_pages_locked(pfns);
      if (!queue.add_used(memory, chain.head, 0)) {
        activation_.interrupt->needs_reset("virtio-balloon: used ring unwritable");
        return;
      }
      used = true;
    }
    if (status == Queue::PopStatus::kError) {
      activation_.interrupt->needs_reset("virtio-balloon inflateq: " + queue.error());
      return;
    }
  } while (queue.enable_notification());
  if (used && queue.needs_notification()) activation_.interrupt->signal_queue(kBalloonInflateQueue);
}

void VirtioBalloon::release_pages_locked(const std::vector<uint32_t>& pfns) {
  // Linux hands over pages in ascending runs more often than not: one madvise per run.
  size_t i = 0;
  while (i < pfns.size()) {
    size_t j = i + 1;
    while (j < pfns.size() && pfns[j] == pfns[j - 1] + 1 && pfns[j] != 0) ++j;
    discard_run_locked(uint64_t(pfns[i]) << kBalloonPageShift, j - i);
    i = j;
  }
}

void VirtioBalloon::discard_run_locked(uint64_t gpa, uint64_t pages) {
  const memory::GuestMemory& memory = *activation_.memory;
  if (memory.discard(gpa, pages * kPageSize)) {
    metrics_.discarded_pages += pages;
    return;
  }
  // The run crosses a region boundary or leaves RAM: page by page, refusing the bad ones.
  for (uint64_t p = 0; p < pages; ++p) {
    uint64_t page = gpa + p * kPageSize;
    if (memory.discard(page, kPageSize)) {
      metrics_.discarded_pages++;
    } else {
      metrics_.bad_pages++;
      log_.warn(fmt::format("virtio-balloon: cannot release guest page {:#x}", page));
    }
  }
}

void VirtioBalloon::deflate_locked(Queue& queue) {
  // Nothing to do for the host: a page the guest takes back faults in again, zeroed.
  const memory::GuestMemory& memory = *activation_.memory;
  bool used = false;
  do {
    DescriptorChain chain;
    Queue::PopStatus status;
    while ((status = queue.pop(memory, chain)) == Queue::PopStatus::kChain) {
      metrics_.deflated_pages += chain.readable_bytes / 4;
      if (!queue.add_used(memory, chain.head, 0)) {
        activation_.interrupt->needs_reset("virtio-balloon: used ring unwritable");
        return;
      }
      used = true;
    }
    if (status == Queue::PopStatus::kError) {
      activation_.interrupt->needs_reset("virtio-balloon deflateq: " + queue.error());
      return;
    }
  } while (queue.enable_notification());
  if (used && queue.needs_notification()) activation_.interrupt->signal_queue(kBalloonDeflateQueue);
}

// The driver keeps one stats buffer with the device; the device returns it to ask for fresh
// figures, the driver refills it and adds it again (spec 5.5.6.3).
void VirtioBalloon::stats_locked(Queue& queue) {
  DescriptorChain chain;
  Queue::PopStatus status;
  // Re-arming the notification (avail_event under EVENT_IDX) is what makes the driver kick
  // for its next report; without it a Linux guest refills the buffer and never says so.
  do {
    while ((status = queue.pop(*activation_.memory, chain)) == Queue::PopStatus::kChain) {
      if (!take_stats_locked(queue, chain)) return;
    }
    if (status == Queue::PopStatus::kError) {
      activation_.interrupt->needs_reset("virtio-balloon statsq: " + queue.error());
      return;
    }
  } while (queue.enable_notification());
}

bool VirtioBalloon::take_stats_locked(Queue& queue, const DescriptorChain& chain) {
  if (stats_head_) {
    // A second buffer while we hold one: give the older one back unread.
    log_.warn("virtio-balloon: driver queued a second statistics buffer");
    if (!queue.add_used(*activation_.memory, *stats_head_, 0)) {
      activation_.interrupt->needs_reset("virtio-balloon: used ring unwritable");
      return false;
    }
    if (queue.needs_notification()) activation_.interrupt->signal_queue(kBalloonStatsQueue);
  }
  std::vector<uint8_t> bytes = readable_bytes(chain);
  for (size_t i = 0; i + kBalloonStatSize <= bytes.size(); i += kBalloonStatSize)
    stats_.values[uint16_t(bytes[i] | bytes[i + 1] << 8)] = load_le64(&bytes[i + 2]);
  // The host's clock, not anything the guest wrote: a buggy guest cannot fake freshness.
  stats_.updated_at = int64_t(std::time(nullptr));
  metrics_.stats_updates++;
  stats_head_ = chain.head;
  return true;
}

bool VirtioBalloon::request_stats() {
  std::lock_guard lock(mutex_);
  if (!active_ || !stats_head_) return false;
  Queue& queue = activation_.queues[kBalloonStatsQueue];
  uint16_t head = *stats_head_;
  stats_head_.reset();
  if (!queue.add_used(*activation_.memory, head, 0)) {
    activation_.interrupt->needs_reset("virtio-balloon: used ring unwritable");
    return false;
  }
  if (queue.needs_notification()) activation_.interrupt->signal_queue(kBalloonStatsQueue);
  return true;
}

BalloonStatsReport VirtioBalloon::stats() const {
  std::lock_guard lock(mutex_);
  return stats_;
}

BalloonState VirtioBalloon::save() const {
  BalloonState state;
  state.num_pages = num_pages_.load();
  state.actual = actual_.load();
  return state;
}

void VirtioBalloon::restore(const BalloonState& state) {
  if (state.version != BalloonState::kVersion)
    throw std::invalid_argument("unsupported virtio-balloon state version");
  num_pages_ = state.num_pages;
  actual_ = state.actual;
}

}  // namespace kiln::devices::virtio
