#include "devices/virtio/virtio_vsock.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <system_error>

namespace kiln::devices::virtio {
namespace {

UniqueFd make_eventfd() {
  UniqueFd fd(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!fd) throw std::system_error(errno, std::generic_category(), "eventfd for virtio-vsock");
  return fd;
}

void signal_eventfd(int fd) {
  uint64_t one = 1;
  [[maybe_unused]] ssize_t n = ::write(fd, &one, sizeof(one));
}

}  // namespace

VirtioVsock::VirtioVsock(uint64_t guest_cid, std::unique_ptr<VsockBackend> backend, EventLoop& loop)
    : guest_cid_(guest_cid), backend_(std::move(backend)), loop_(loop) {
  for (int i = 0; i < 2; ++i) {
    kick_[i] = make_eventfd();
    call_[i] = make_eventfd();
  }
}

VirtioVsock::~VirtioVsock() {
  std::lock_guard lock(mutex_);
  stop_locked();
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
  const memory::GuestMemory& memory = *activation.memory;
  VsockStart start;
  start.features = activation.acked_features;
  start.memory = &memory;
  for (uint16_t q : {kVsockRxQueue, kVsockTxQueue}) {
    const Queue& queue = activation.queues[q];
    if (!queue.ready()) {
      log_.warn("virtio-vsock: the driver did not enable the rx and tx queues");
      return false;
    }
    auto ring = describe_kernel_ring(queue, q, memory, kick_[q].get(), call_[q].get());
    if (!ring) return false;
    start.rings.push_back(*ring);
  }
  // The back-end's "call" means used buffers: raise the queue's interrupt. No device lock in
  // the callback: reset() removes these watches while holding it.
  VirtioInterrupt* interrupt = activation.interrupt;
  for (uint16_t q : {kVsockRxQueue, kVsockTxQueue}) {
    int fd = call_[q].get();
    loop_.add(fd, [this, fd, q, interrupt](uint32_t) {
      uint64_t count;
      if (::read(fd, &count, sizeof(count)) != sizeof(count)) return;
      metrics_.calls++;
      interrupt->signal_queue(q);
    });
  }
  watching_ = true;
  try {
    backend_->start(start);
  } catch (const std::exception& e) {
    log_.warn(std::string("virtio-vsock: cannot start the back-end: ") + e.what());
    stop_locked();
    return false;
  }
  metrics_.starts++;
  activation_ = activation;
  active_ = true;
  // Buffers the driver made available before the back-end ran are seen on this first kick.
  for (auto& kick : kick_) signal_eventfd(kick.get());
  return true;
}

void VirtioVsock::process_queue(uint16_t queue) {
  if (queue == kVsockRxQueue || queue == kVsockTxQueue) {
    metrics_.kicks++;
    signal_eventfd(kick_[queue].get());
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
  if (active_) {
    try {
      backend_->stop();
    } catch (const std::exception& e) {
      log_.warn(std::string("virtio-vsock: stopping the back-end: ") + e.what());
    }
  }
  if (watching_) {
    for (auto& call : call_) loop_.remove(call.get());
    watching_ = false;
  }
  active_ = false;
  activation_ = {};
  event_heads_.clear();
}

}  // namespace kiln::devices::virtio
