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
  for (uint16_t q : {kVsockRxQueue, kVsockTxQueue}) {
    if (!activation.queues[q].ready()) {
      log_.warn("virtio-vsock: the driver did not enable the rx and tx queues");
      return false;
    }
  }
  activation_ = activation;
  relay_calls_locked();
  if (!start_backend_locked()) {
    stop_locked();
    return false;
  }
  active_ = true;
  return true;
}

// The back-end's "call" means used buffers: raise the queue's interrupt. No device lock in the
// callback: reset() removes these watches while holding it.
void VirtioVsock::relay_calls_locked() {
  VirtioInterrupt* interrupt = activation_.interrupt;
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
}

// Hands rx and tx, from where the queues stand, to the back-end.
bool VirtioVsock::start_backend_locked() {
  const memory::GuestMemory& memory = *activation_.memory;
  VsockStart start;
  start.features = activation_.acked_features;
  start.memory = &memory;
  for (uint16_t q : {kVsockRxQueue, kVsockTxQueue}) {
    auto ring =
        describe_kernel_ring(activation_.queues[q], q, memory, kick_[q].get(), call_[q].get());
    if (!ring) return false;
    start.rings.push_back(*ring);
  }
  try {
    backend_->start(start);
  } catch (const std::exception& e) {
    log_.warn(std::string("virtio-vsock: cannot start the back-end: ") + e.what());
    return false;
  }
  metrics_.starts++;
  // Buffers the driver made available before the back-end ran are seen on this first kick.
  for (auto& kick : kick_) signal_eventfd(kick.get());
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
  if (active_ && !paused_) {
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
  paused_ = false;
  activation_ = {};
  event_heads_.clear();
}

}  // namespace kiln::devices::virtio
