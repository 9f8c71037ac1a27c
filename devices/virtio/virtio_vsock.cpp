#include "devices/virtio/virtio_vsock.h"

#include <spdlog/spdlog.h>

namespace kiln::devices::virtio {

VirtioVsock::VirtioVsock(uint64_t guest_cid, std::unique_ptr<VsockBackend> backend, EventLoop& loop)
    : guest_cid_(guest_cid), backend_(std::move(backend)), events_(loop, 2, "virtio-vsock") {}

VirtioVsock::~VirtioVsock() {
  {
    std::lock_guard lock(mutex_);
    activation_.interrupt = nullptr;  // the transport may be half gone: no interrupts
    stop_locked();
  }
  const VsockMetrics& m = metrics_;
  spdlog::debug(
      "virtio-vsock cid {}: {} back-end starts ({} rings with direct kicks, {} with direct "
      "interrupts), {} relayed kicks, {} relayed interrupts",
      guest_cid_, m.starts.load(), m.direct_kicks.load(), m.direct_calls.load(), m.kicks.load(),
      m.calls.load());
}

uint64_t VirtioVsock::device_features() const {
  return (kFeatureVersion1 | kFeatureRingIndirectDesc | kFeatureRingEventIdx) &
         backend_->features();
}

void VirtioVsock::read_config(uint64_t offset, std::span<uint8_t> data) {
  for (size_t i = 0; i < data.size(); ++i)
    data[i] = offset + i < kVsockConfigSize ? uint8_t(guest_cid_ >> (8 * (offset + i))) : 0;
}

bool VirtioVsock::activate(const VirtioActivation& activation) {
  std::lock_guard lock(mutex_);
  if (activation.queues.size() != 3) return false;
  for (uint16_t q : {kVsockRxQueue, kVsockTxQueue}) {
    if (!activation.queues[q].ready()) {
      log_.warn("virtio-vsock: the driver did not enable the rx and tx queues");
      return false;
    }
  }
  activation_ = activation;
  if (!start_backend_locked()) {
    stop_locked();
    return false;
  }
  active_ = true;
  return true;
}

// Hands rx and tx, from where the queues stand, to the back-end.
bool VirtioVsock::start_backend_locked() {
  const memory::GuestMemory& memory = *activation_.memory;
  VsockStart start;
  start.features = activation_.acked_features;
  start.memory = &memory;
  // As virtio-net's kernel data path: kicks and interrupts go between KVM and vhost-vsock
  // directly where they can (KernelRingEvents), relayed by kiln only where they cannot.
  events_.connect(activation_, [this](uint16_t) { metrics_.calls++; });
  for (uint16_t q : {kVsockRxQueue, kVsockTxQueue}) {
    auto ring = describe_kernel_ring(activation_.queues[q], q, memory, events_.kick_fd(q),
                                     events_.call_fd(q));
    if (!ring) {
      events_.disconnect(nullptr);
      return false;
    }
    start.rings.push_back(*ring);
    if (events_.direct_kick(q)) metrics_.direct_kicks++;
    if (events_.direct_call(q)) metrics_.direct_calls++;
  }
  try {
    backend_->start(start);
  } catch (const std::exception& e) {
    log_.warn(std::string("virtio-vsock: cannot start the back-end: ") + e.what());
    events_.disconnect(nullptr);
    return false;
  }
  metrics_.starts++;
  events_.kick_all();  // buffers the driver made available before the back-end ran
  return true;
}

void VirtioVsock::pause() {
  std::lock_guard lock(mutex_);
  if (!active_ || paused_) return;
  paused_ = true;
  std::vector<uint16_t> next_avail;
  try {
    next_avail = backend_->stop();
  } catch (const std::exception& e) {
    log_.warn(std::string("virtio-vsock: stopping the back-end: ") + e.what());
  }
  events_.disconnect(activation_.interrupt);
  for (size_t i = 0; i < next_avail.size() && i < 2; ++i) {
    if (auto error =
            take_back_kernel_ring(activation_.queues[i], next_avail[i], *activation_.memory)) {
      log_.warn("virtio-vsock: taking the rings back: " + *error);
    }
  }
}

void VirtioVsock::resume() {
  std::lock_guard lock(mutex_);
  if (!active_ || !paused_) return;
  paused_ = false;
  if (!start_backend_locked())
    activation_.interrupt->needs_reset("virtio-vsock: the back-end did not restart");
}

void VirtioVsock::process_queue(uint16_t queue) {
  if (queue == kVsockRxQueue || queue == kVsockTxQueue) {
    // Only without a transport eventfd (see handles_notifications). No lock: pause() and
    // reset() wait for the loop while holding it.
    metrics_.kicks++;
    events_.relay_kick(queue);
    return;
  }
  std::lock_guard lock(mutex_);
  if (active_ && queue == kVsockEventQueue) take_event_buffers_locked();
}

// The driver keeps the event queue stocked; the buffers wait with us for an event to report
// (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, after a migration).
void VirtioVsock::take_event_buffers_locked() {
  Queue& queue = activation_.queues[kVsockEventQueue];
  if (!queue.ready()) return;
  DescriptorChain chain;
  Queue::PopStatus status;
  while ((status = queue.pop(*activation_.memory, chain)) == Queue::PopStatus::kChain)
    event_heads_.push_back(chain.head);
  if (status == Queue::PopStatus::kError)
    activation_.interrupt->needs_reset("virtio-vsock eventq: " + queue.error());
}

size_t VirtioVsock::event_buffers() const {
  std::lock_guard lock(mutex_);
  return event_heads_.size();
}

void VirtioVsock::reset() {
  std::lock_guard lock(mutex_);
  stop_locked();
}

void VirtioVsock::stop_locked() {
  if (active_ && !paused_) {
    try {
      backend_->stop();
    } catch (const std::exception& e) {
      log_.warn(std::string("virtio-vsock: stopping the back-end: ") + e.what());
    }
    events_.disconnect(activation_.interrupt);
  }
  active_ = false;
  paused_ = false;
  activation_ = {};
  event_heads_.clear();
}

}  // namespace kiln::devices::virtio
