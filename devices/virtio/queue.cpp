#include "devices/virtio/queue.h"

#include <atomic>
#include <bit>
#include <cstring>
#include <stdexcept>

namespace kiln::devices::virtio {
namespace {

static_assert(std::endian::native == std::endian::little,
              "virtio 1.x rings are little-endian; kiln only runs on little-endian hosts");

// Guest-shared 16-bit ring fields are accessed atomically: the driver updates them
// concurrently, and idx carries the acquire/release pairing the spec's barriers describe.
uint16_t load16(const uint8_t* at, std::memory_order order) {
  return std::atomic_ref<uint16_t>(*reinterpret_cast<uint16_t*>(const_cast<uint8_t*>(at)))
      .load(order);
}

void store16(uint8_t* at, uint16_t value, std::memory_order order) {
  std::atomic_ref<uint16_t>(*reinterpret_cast<uint16_t*>(at)).store(value, order);
}

void store32(uint8_t* at, uint32_t value) {
  std::atomic_ref<uint32_t>(*reinterpret_cast<uint32_t*>(at))
      .store(value, std::memory_order_relaxed);
}

struct RawDescriptor {
  uint64_t addr;
  uint32_t len;
  uint16_t flags;
  uint16_t next;
};
static_assert(sizeof(RawDescriptor) == kDescriptorSize);

// Byte sizes of the three areas for a queue of `size` entries (spec 2.7, including the
// event-index fields, which the driver lays out whether or not EVENT_IDX is negotiated).
uint64_t desc_table_bytes(uint16_t size) { return uint64_t(kDescriptorSize) * size; }
uint64_t avail_ring_bytes(uint16_t size) { return 6 + 2ull * size; }
uint64_t used_ring_bytes(uint16_t size) { return 6 + 8ull * size; }

bool is_power_of_two(uint32_t value) { return value && !(value & (value - 1)); }

}  // namespace

Queue::Queue(uint16_t max_size) : max_size_(max_size), size_(max_size) {
  if (!is_power_of_two(max_size) || max_size > 32768)
    throw std::invalid_argument("virtqueue maximum size must be a power of two <= 32768");
}

void Queue::set_features(bool indirect, bool event_idx) {
  indirect_ = indirect;
  event_idx_ = event_idx;
}

std::optional<std::string> Queue::activate(const memory::GuestMemory& memory) {
  desc_ = nullptr;
  avail_ = used_ = nullptr;
  if (!is_power_of_two(size_) || size_ > max_size_)
    return "queue size " + std::to_string(size_) +
           " is not a power of two <= " + std::to_string(max_size_);
  if (desc_table_ % 16 || avail_ring_ % 2 || used_ring_ % 4) return "ring misaligned";
  auto desc = memory.slice(desc_table_, desc_table_bytes(size_));
  auto avail = memory.slice(avail_ring_, avail_ring_bytes(size_));
  auto used = memory.slice(used_ring_, used_ring_bytes(size_));
  if (!desc) return "descriptor table outside guest memory";
  if (!avail) return "available ring outside guest memory";
  if (!used) return "used ring outside guest memory";
  desc_ = desc->data();
  avail_ = avail->data();
  used_ = used->data();
  return std::nullopt;
}

Queue::PopStatus Queue::fail(std::string why) {
  broken_ = true;
  error_ = std::move(why);
  return PopStatus::kError;
}

bool Queue::reject(std::string why) {
  fail(std::move(why));
  return false;
}

uint16_t Queue::load_avail_idx() const { return load16(avail_ + 2, std::memory_order_acquire); }

Queue::PopStatus Queue::pop(const memory::GuestMemory& memory, DescriptorChain& chain) {
  if (!active() || broken_) return broken_ ? PopStatus::kError : PopStatus::kEmpty;
  uint16_t avail_idx = load_avail_idx();
  uint16_t pending = uint16_t(avail_idx - next_avail_);
  if (pending == 0) return PopStatus::kEmpty;
  if (pending > size_) {
    return fail("available index moved by " + std::to_string(pending) + " > queue size " +
                std::to_string(size_));
  }
  uint16_t head = load16(avail_ + 4 + 2 * (next_avail_ % size_), std::memory_order_relaxed);
  ++next_avail_;
  chain = DescriptorChain{};
  chain.head = head;
  if (head >= size_) return fail("head descriptor index " + std::to_string(head) + " out of range");
  if (!walk_chain(memory, head, chain)) return PopStatus::kError;
  return PopStatus::kChain;
}

void Queue::undo_pop(uint16_t count) { next_avail_ = uint16_t(next_avail_ - count); }

bool Queue::walk_chain(const memory::GuestMemory& memory, uint16_t head, DescriptorChain& chain) {
  const uint8_t* table = desc_;
  uint32_t table_entries = size_;
  bool in_indirect = false;
  bool seen_writable = false;
  uint32_t index = head;
  uint32_t visited = 0;
  for (;;) {
    // A chain can use each descriptor of its table at most once; more means a loop.
    if (++visited > table_entries) {
      return reject("descriptor chain loops or is longer than its table");
    }
    RawDescriptor raw;
    std::memcpy(&raw, table + uint64_t(index) * kDescriptorSize, sizeof(raw));
    if (raw.flags & kDescFlagIndirect) {
      if (!indirect_) return reject("indirect descriptor without VIRTIO_F_INDIRECT_DESC");
      if (in_indirect) return reject("indirect descriptor inside an indirect table");
      if (raw.flags & kDescFlagNext) return reject("indirect descriptor with NEXT set");
      if (raw.len == 0 || raw.len % kDescriptorSize)
        return reject("indirect table length " + std::to_string(raw.len) + " not a multiple of 16");
      if (raw.len / kDescriptorSize > kMaxIndirectEntries)
        return reject("indirect table longer than " + std::to_string(kMaxIndirectEntries));
      auto indirect = memory.slice(raw.addr, raw.len);
      if (!indirect) return reject("indirect table outside guest memory");
      table = indirect->data();
      table_entries = raw.len / kDescriptorSize;
      in_indirect = true;
      index = 0;
      visited = 0;
      continue;
    }
    auto buffer = memory.slice(raw.addr, raw.len);
    if (!buffer) return reject("descriptor buffer outside guest memory");
    bool writable = raw.flags & kDescFlagWrite;
    // Spec 2.7.4.2: device-writable descriptors come after all device-readable ones.
    if (!writable && seen_writable) return reject("readable descriptor after a writable one");
    seen_writable |= writable;
    chain.descriptors.push_back({raw.addr, raw.len, writable, buffer->data()});
    (writable ? chain.writable_bytes : chain.readable_bytes) += raw.len;
    if (!(raw.flags & kDescFlagNext)) return true;
    index = raw.next;
    if (index >= table_entries) {
      return reject("next descriptor index " + std::to_string(index) + " out of range");
    }
  }
}

bool Queue::add_used(const memory::GuestMemory& memory, uint16_t head, uint32_t written) {
  const UsedElement element{head, written};
  return add_used(memory, std::span(&element, 1));
}

bool Queue::add_used(const memory::GuestMemory& memory, std::span<const UsedElement> elements) {
  if (!active() || broken_) return false;
  // More than a ring's worth would overwrite entries the driver has not read yet.
  if (elements.size() > size_) return reject("more used elements than the queue holds");
  for (const UsedElement& used : elements) {
    uint8_t* element = used_ + 4 + 8ull * (next_used_ % size_);
    store32(element, used.head);
    store32(element + 4, used.written);
    ++next_used_;
  }
  if (elements.empty()) return true;
  // Release: the element and the buffers' contents are visible before the driver sees idx.
  store16(used_ + 2, next_used_, std::memory_order_release);
  memory.mark_dirty(used_ring_, used_ring_bytes(size_));
  return true;
}

bool Queue::needs_notification() {
  if (!active()) return false;
  // The used idx store must be globally visible before we read the driver's suppression
  // state, or we can miss a driver that just re-enabled interrupts (spec 2.7.10 "mb()").
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (!event_idx_) {
    return !(load16(avail_, std::memory_order_relaxed) & kAvailFlagNoInterrupt);
  }
  uint16_t used_event = load16(avail_ + 4 + 2ull * size_, std::memory_order_relaxed);
  uint16_t old_idx = signalled_used_;
  uint16_t new_idx = next_used_;
  bool valid = signalled_used_valid_;
  signalled_used_ = new_idx;
  signalled_used_valid_ = true;
  if (!valid) return true;
  // vring_need_event: notify iff used_event lies in (old_idx, new_idx].
  return uint16_t(new_idx - used_event - 1) < uint16_t(new_idx - old_idx);
}

bool Queue::enable_notification() {
  if (!active() || broken_) return false;
  if (event_idx_) {
    store16(used_ + 4 + 8ull * size_, next_avail_, std::memory_order_relaxed);
  } else {
    store16(used_, 0, std::memory_order_relaxed);  // clear VIRTQ_USED_F_NO_NOTIFY
  }
  // Publish avail_event before re-reading avail idx (pairs with the driver's barrier).
  std::atomic_thread_fence(std::memory_order_seq_cst);
  return load_avail_idx() != next_avail_;
}

void Queue::reset() {
  size_ = max_size_;
  ready_ = false;
  desc_table_ = avail_ring_ = used_ring_ = 0;
  indirect_ = event_idx_ = false;
  desc_ = nullptr;
  avail_ = used_ = nullptr;
  next_avail_ = next_used_ = 0;
  signalled_used_ = 0;
  signalled_used_valid_ = false;
  broken_ = false;
  error_.clear();
}

QueueState Queue::save() const {
  QueueState state;
  state.size = size_;
  state.ready = ready_;
  state.desc_table = desc_table_;
  state.avail_ring = avail_ring_;
  state.used_ring = used_ring_;
  state.next_avail = next_avail_;
  state.next_used = next_used_;
  state.signalled_used = signalled_used_;
  state.signalled_used_valid = signalled_used_valid_;
  state.indirect = indirect_;
  state.event_idx = event_idx_;
  return state;
}

void Queue::restore(const QueueState& state, const memory::GuestMemory& memory) {
  if (state.version != QueueState::kVersion) throw std::invalid_argument("bad queue state version");
  reset();
  size_ = state.size;
  ready_ = state.ready;
  desc_table_ = state.desc_table;
  avail_ring_ = state.avail_ring;
  used_ring_ = state.used_ring;
  indirect_ = state.indirect;
  event_idx_ = state.event_idx;
  next_avail_ = state.next_avail;
  next_used_ = state.next_used;
  signalled_used_ = state.signalled_used;
  signalled_used_valid_ = state.signalled_used_valid;
  if (ready_) {
    if (auto error = activate(memory)) throw std::invalid_argument("restored queue: " + *error);
  }
}

}  // namespace kiln::devices::virtio
