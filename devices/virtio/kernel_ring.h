// A virtqueue handed to a host-kernel back-end (vhost): what the kernel needs to run the ring
// straight from guest memory. Shared by the devices whose data path runs in the kernel
// (virtio-vsock, virtio-net with vhost=on); the VMM turns it into vhost ioctls.
#pragma once

#include <cstdint>
#include <exception>
#include <optional>
#include <string>

#include "devices/virtio/queue.h"
#include "memory/guest_memory.h"

namespace kiln::devices::virtio {

// One ring as the back-end needs it: size, where to start, host addresses of its parts, and
// the eventfds for notifications (kick: device -> back-end, call: back-end -> device).
struct KernelRing {
  uint16_t index = 0;
  uint16_t size = 0;
  uint16_t next_avail = 0;
  uint64_t desc_host = 0, avail_host = 0, used_host = 0;
  int kick_fd = -1;
  int call_fd = -1;
};

// Describes an activated `queue` (Queue::activate already checked that its parts lie inside
// guest memory); nullopt if a part cannot be mapped.
inline std::optional<KernelRing> describe_kernel_ring(const Queue& queue, uint16_t index,
                                                      const memory::GuestMemory& memory,
                                                      int kick_fd, int call_fd) {
  auto host = [&](uint64_t gpa, uint64_t len) -> uint64_t {
    auto slice = memory.slice(gpa, len);
    return slice ? reinterpret_cast<uint64_t>(slice->data()) : 0;
  };
  KernelRing ring;
  ring.index = index;
  ring.size = queue.size();
  ring.next_avail = queue.next_avail();
  ring.desc_host = host(queue.desc_table(), 16ull * queue.size());
  ring.avail_host = host(queue.avail_ring(), 6 + 2ull * queue.size());
  ring.used_host = host(queue.used_ring(), 6 + 8ull * queue.size());
  if (!ring.desc_host || !ring.avail_host || !ring.used_host) return std::nullopt;
  ring.kick_fd = kick_fd;
  ring.call_fd = call_fd;
  return ring;
}

// After the back-end stopped a ring: the queue carries on where the kernel got to, the avail
// index as the kernel reports it (VHOST_GET_VRING_BASE) and the used index from the ring the
// kernel wrote. Returns an error text (the queue unchanged) if that state is refused.
inline std::optional<std::string> take_back_kernel_ring(Queue& queue, uint16_t next_avail,
                                                        const memory::GuestMemory& memory) {
  QueueState state = queue.save();
  auto used_idx = memory.read_obj<uint16_t>(queue.used_ring() + 2);
  if (!used_idx) return "used ring outside guest memory";
  state.next_avail = next_avail;
  state.next_used = *used_idx;
  state.signalled_used_valid = false;  // the kernel decided; the next interrupt is not skipped
  try {
    queue.restore(state, memory);
  } catch (const std::exception& e) {
    return e.what();
  }
  return std::nullopt;
}

}  // namespace kiln::devices::virtio
