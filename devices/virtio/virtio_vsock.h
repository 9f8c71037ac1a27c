// virtio-vsock (virtio 1.2 section 5.10) whose rx and tx queues a host-kernel back-end processes
// (vhost-vsock, behind VsockBackend): the device model does the virtio side (features, the
// guest_cid config field, activation and reset) and hands the rings over. Kicks and interrupts
// pass between KVM and the back-end without kiln (KernelRingEvents). The event queue stays in
// userspace: its buffers are kept for transport events (none are sent while the VM runs on one
// host).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "base/event_loop.h"
#include "base/unique_fd.h"
#include "devices/virtio/kernel_ring.h"
#include "devices/virtio/rate_limited_log.h"
#include "devices/virtio/virtio_device.h"

namespace kiln::devices::virtio {

inline constexpr uint32_t kDeviceIdVsock = 19;
inline constexpr uint16_t kVsockRxQueue = 0;
inline constexpr uint16_t kVsockTxQueue = 1;
inline constexpr uint16_t kVsockEventQueue = 2;
inline constexpr uint32_t kVsockConfigSize = 8;  // le64 guest_cid

using VsockRing = KernelRing;

struct VsockStart {
  uint64_t features = 0;  // negotiated with the driver
  const memory::GuestMemory* memory = nullptr;
  std::vector<VsockRing> rings;  // rx and tx
};

// Implemented by the VMM over vhost-vsock. Called from the thread that activates or resets
// the device; throws std::exception on failure.
class VsockBackend {
 public:
  virtual ~VsockBackend() = default;
  // Ring and device features the back-end can do (VIRTIO_F_*, VIRTIO_RING_F_*).
  virtual uint64_t features() const = 0;
  virtual void start(const VsockStart& start) = 0;
  // Stops both rings; returns where the kernel got to in each (rx, tx: next avail index).
  virtual std::vector<uint16_t> stop() = 0;
};

struct VsockMetrics {
  std::atomic<uint64_t> kicks{0};  // relayed by kiln (rings without a transport eventfd)
  std::atomic<uint64_t> calls{0};  // relayed by kiln (vectors without an irqfd)
  std::atomic<uint64_t> starts{0};
  std::atomic<uint64_t> direct_kicks{0};  // rings started on the transport's notify eventfd
  std::atomic<uint64_t> direct_calls{0};  // rings started on the vector's irqfd
};

class VirtioVsock : public VirtioDevice {
 public:
  // `loop` relays what cannot go directly; it must outlive the device.
  VirtioVsock(uint64_t guest_cid, std::unique_ptr<VsockBackend> backend, EventLoop& loop);
  ~VirtioVsock() override;

  uint32_t device_type() const override { return kDeviceIdVsock; }
  uint32_t pci_class_code() const override { return 0x078000; }  // simple comms, other
  uint64_t device_features() const override;
  uint16_t num_queues() const override { return 3; }
  uint32_t config_size() const override { return kVsockConfigSize; }
  void read_config(uint64_t offset, std::span<uint8_t> data) override;

  bool activate(const VirtioActivation& activation) override;
  void process_queue(uint16_t queue) override;
  bool handles_notifications(uint16_t queue) const override { return queue <= kVsockTxQueue; }
  void reset() override;

  uint64_t guest_cid() const { return guest_cid_; }
  // Event-queue buffers the driver has given us (and we keep).
  size_t event_buffers() const;
  const VsockMetrics& metrics() const { return metrics_; }

  // Stops vhost-vsock and writes where it got to back into the rx and tx queues, so that the
  // transport's save() describes the rings exactly; resume() hands them back. For a paused VM
  // (vCPUs stopped), as VirtioNet::pause().
  void pause();
  void resume();

 private:
  bool start_backend_locked();
  void stop_locked();
  void take_event_buffers_locked();

  const uint64_t guest_cid_;
  std::unique_ptr<VsockBackend> backend_;
  KernelRingEvents events_;
  mutable std::mutex mutex_;
  bool active_ = false;
  bool paused_ = false;
  VirtioActivation activation_;
  std::vector<uint16_t> event_heads_;
  VsockMetrics metrics_;
  RateLimitedLog log_;
};

}  // namespace kiln::devices::virtio
