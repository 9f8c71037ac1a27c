// A virtqueue handed to a host-kernel back-end (vhost): what the kernel needs to run the ring
// straight from guest memory. Shared by the devices whose data path runs in the kernel
// (virtio-vsock, virtio-net with vhost=on); the VMM turns it into vhost ioctls.
#pragma once

#include <atomic>
#include <cstdint>
#include <exception>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "base/event_loop.h"
#include "base/unique_fd.h"
#include "devices/virtio/queue.h"
#include "devices/virtio/virtio_device.h"
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

// The notification plumbing of the rings a kernel back-end runs, queues 0 .. rings-1. Per ring
// the back-end waits on the transport's notify eventfd (a KVM ioeventfd in kiln, so a guest kick
// never wakes kiln) and signals the queue's MSI-X irqfd (so the interrupt never passes through
// kiln either; a masked vector holds it back itself). Where either is missing (tests, MSI-X
// off) our own eventfds stand in: kicks are relayed from process_queue, calls from the loop.
class KernelRingEvents {
 public:
  KernelRingEvents(EventLoop& loop, size_t rings, const char* device);
  ~KernelRingEvents();
  KernelRingEvents(const KernelRingEvents&) = delete;
  KernelRingEvents& operator=(const KernelRingEvents&) = delete;

  // Chooses each ring's eventfds for `activation` and starts relaying the calls that need it;
  // `on_relayed_call(queue)` runs on the loop thread before each relayed interrupt.
  void connect(const VirtioActivation& activation,
               std::function<void(uint16_t)> on_relayed_call = {});
  // Stops relaying. A call the back-end raised just before goes to `deliver_to` (null when the
  // transport is going away). Call after the back-end stopped; the relay takes no device lock.
  void disconnect(VirtioInterrupt* deliver_to);

  int kick_fd(uint16_t ring) const { return kicks_[ring].load(); }
  int call_fd(uint16_t ring) const { return calls_[ring]; }
  bool direct_kick(uint16_t ring) const { return kick_fd(ring) != own_kicks_[ring].get(); }
  bool direct_call(uint16_t ring) const { return call_fd(ring) != own_calls_[ring].get(); }
  // One kick per ring: buffers the driver made available before the back-end ran.
  void kick_all() const;
  // Relays a driver notification that reached the device's process_queue. Lock-free; a kick
  // while the back-end is stopped stays in the eventfd.
  void relay_kick(uint16_t ring) const;

 private:
  EventLoop& loop_;
  std::vector<UniqueFd> own_kicks_, own_calls_;
  std::vector<std::atomic<int>> kicks_;  // read by relay_kick without the device's lock
  std::vector<int> calls_;
  std::vector<bool> relaying_;  // the loop watches own_calls_[ring]
};

}  // namespace kiln::devices::virtio
