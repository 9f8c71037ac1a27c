// Split virtqueue (virtio 1.2 section 2.7), device side. Every ring and buffer access goes
// through guest memory that was bounds-checked first; everything the guest wrote is copied out
// once and then validated, so a driver racing with the device cannot make us use unchecked
// values. A malformed chain marks the queue broken: the device then reports NEEDS_RESET.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "memory/guest_memory.h"

namespace kiln::devices::virtio {

inline constexpr uint16_t kDescFlagNext = 1;
inline constexpr uint16_t kDescFlagWrite = 2;
inline constexpr uint16_t kDescFlagIndirect = 4;
inline constexpr uint16_t kAvailFlagNoInterrupt = 1;
inline constexpr uint16_t kUsedFlagNoNotify = 1;
inline constexpr uint32_t kDescriptorSize = 16;
// Bounds the work one indirect chain can cause (Linux uses at most a few hundred entries).
inline constexpr uint32_t kMaxIndirectEntries = 4096;

// One validated buffer of a chain: [gpa, gpa+len) lies inside one guest memory region and
// `host` points at it.
struct Descriptor {
  uint64_t gpa = 0;
  uint32_t len = 0;
  bool writable = false;
  uint8_t* host = nullptr;
};

struct DescriptorChain {
  uint16_t head = 0;
  std::vector<Descriptor> descriptors;  // all readable ones first, then all writable ones
  uint64_t readable_bytes = 0;
  uint64_t writable_bytes = 0;
};

// Snapshot of one queue (plain data; see Queue::save/restore).
struct QueueState {
  static constexpr uint32_t kVersion = 1;
  uint32_t version = kVersion;
  uint16_t size = 0;
  bool ready = false;
  uint64_t desc_table = 0;
  uint64_t avail_ring = 0;
  uint64_t used_ring = 0;
  uint16_t next_avail = 0;
  uint16_t next_used = 0;
  uint16_t signalled_used = 0;
  bool signalled_used_valid = false;
  bool indirect = false;
  bool event_idx = false;
};

class Queue {
 public:
  explicit Queue(uint16_t max_size);

  // Driver-programmed configuration (virtio-pci common config); checked by activate().
  uint16_t max_size() const { return max_size_; }
  uint16_t size() const { return size_; }
  void set_size(uint16_t size) { size_ = size; }
  bool ready() const { return ready_; }
  void set_ready(bool ready) { ready_ = ready; }
  uint64_t desc_table() const { return desc_table_; }
  uint64_t avail_ring() const { return avail_ring_; }
  uint64_t used_ring() const { return used_ring_; }
  void set_desc_table(uint64_t gpa) { desc_table_ = gpa; }
  void set_avail_ring(uint64_t gpa) { avail_ring_ = gpa; }
  void set_used_ring(uint64_t gpa) { used_ring_ = gpa; }
  // Negotiated ring features (VIRTIO_F_INDIRECT_DESC, VIRTIO_F_EVENT_IDX).
  void set_features(bool indirect, bool event_idx);

  // Checks size (power of two, <= max) and ring placement/alignment, and caches the rings'
  // host addresses. Returns a description of what is wrong, or nullopt when usable.
  std::optional<std::string> activate(const memory::GuestMemory& memory);
  bool active() const { return avail_ != nullptr; }
  // Set once the driver broke the ring protocol; pop/add_used refuse to work until reset().
  bool broken() const { return broken_; }
  const std::string& error() const { return error_; }

  enum class PopStatus { kEmpty, kChain, kError };
  // Takes the next available chain. kError: the queue is now broken (see error()).
  PopStatus pop(const memory::GuestMemory& memory, DescriptorChain& chain);
  // Gives back the `count` chains most recently taken by pop() and not yet used, so the next
  // pop() returns them again (a device that popped a buffer before learning it has nothing to
  // put in it, e.g. a network receive buffer when the back-end had no packet).
  void undo_pop(uint16_t count = 1);
  // Puts a chain back into the used ring with `written` bytes; false (and broken) if the used
  // ring cannot be written.
  bool add_used(const memory::GuestMemory& memory, uint16_t head, uint32_t written);
  // Puts several chains back and moves the used index once, so the driver sees all of them or
  // none (a network packet spread over several receive buffers, spec 5.1.6.4). At most size()
  // elements.
  struct UsedElement {
    uint16_t head;
    uint32_t written;
  };
  bool add_used(const memory::GuestMemory& memory, std::span<const UsedElement> elements);
  // Whether the driver wants an interrupt for the used entries added since the last call
  // (VIRTQ_AVAIL_F_NO_INTERRUPT or, with EVENT_IDX, used_event).
  bool needs_notification();
  // Re-arms driver->device notifications after the device drained the ring (avail_event with
  // EVENT_IDX) and tells whether more chains arrived meanwhile.
  bool enable_notification();

  uint16_t next_avail() const { return next_avail_; }
  uint16_t next_used() const { return next_used_; }

  // Back to the state after construction (driver reset).
  void reset();
  QueueState save() const;
  // Restores; an active queue is re-activated against `memory`. Throws on a bad state.
  void restore(const QueueState& state, const memory::GuestMemory& memory);

 private:
  PopStatus fail(std::string why);
  bool reject(std::string why);
  uint16_t load_avail_idx() const;
  bool walk_chain(const memory::GuestMemory& memory, uint16_t head, DescriptorChain& chain);

  uint16_t max_size_;
  uint16_t size_;
  bool ready_ = false;
  uint64_t desc_table_ = 0;
  uint64_t avail_ring_ = 0;
  uint64_t used_ring_ = 0;
  bool indirect_ = false;
  bool event_idx_ = false;

  // Host views of the rings, valid while active.
  const uint8_t* desc_ = nullptr;
  uint8_t* avail_ = nullptr;
  uint8_t* used_ = nullptr;
  uint16_t next_avail_ = 0;
  uint16_t next_used_ = 0;
  uint16_t signalled_used_ = 0;
  bool signalled_used_valid_ = false;
  bool broken_ = false;
  std::string error_;
};

}  // namespace kiln::devices::virtio
