#include "devices/virtio/kernel_ring.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <string>
#include <system_error>

namespace kiln::devices::virtio {
namespace {

UniqueFd make_eventfd(const char* device) {
  UniqueFd fd(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!fd) {
    throw std::system_error(errno, std::generic_category(), std::string("eventfd for ") + device);
  }
  return fd;
}

void signal_eventfd(int fd) {
  uint64_t one = 1;
  [[maybe_unused]] ssize_t n = ::write(fd, &one, sizeof(one));
}

bool take_eventfd(int fd) {
  uint64_t count;
  return ::read(fd, &count, sizeof(count)) == sizeof(count);
}

}  // namespace

KernelRingEvents::KernelRingEvents(EventLoop& loop, size_t rings, const char* device)
    : loop_(loop), kicks_(rings), calls_(rings, -1), relaying_(rings, false) {
  for (size_t i = 0; i < rings; ++i) {
    own_kicks_.push_back(make_eventfd(device));
    own_calls_.push_back(make_eventfd(device));
    kicks_[i] = own_kicks_[i].get();
    calls_[i] = own_calls_[i].get();
  }
}

KernelRingEvents::~KernelRingEvents() { disconnect(nullptr); }

void KernelRingEvents::connect(const VirtioActivation& activation,
                               std::function<void(uint16_t)> on_relayed_call) {
  disconnect(nullptr);
  VirtioInterrupt* interrupt = activation.interrupt;
  for (uint16_t q = 0; q < kicks_.size(); ++q) {
    const bool transport_fd = q < activation.notify_eventfds.size();
    kicks_[q] = transport_fd ? activation.notify_eventfds[q] : own_kicks_[q].get();
    const int irqfd = interrupt ? interrupt->queue_irqfd(q) : -1;
    calls_[q] = irqfd >= 0 ? irqfd : own_calls_[q].get();
    if (irqfd >= 0) continue;
    relaying_[q] = true;
    const int fd = own_calls_[q].get();
    loop_.add(fd, [fd, q, interrupt, on_relayed_call](uint32_t) {
      if (!take_eventfd(fd)) return;
      if (on_relayed_call) on_relayed_call(q);
      if (interrupt) interrupt->signal_queue(q);
    });
  }
}

void KernelRingEvents::disconnect(VirtioInterrupt* deliver_to) {
  for (uint16_t q = 0; q < relaying_.size(); ++q) {
    if (!relaying_[q]) continue;
    relaying_[q] = false;
    loop_.remove(own_calls_[q].get());
    if (take_eventfd(own_calls_[q].get()) && deliver_to) deliver_to->signal_queue(q);
  }
}

void KernelRingEvents::kick_all() const {
  for (const auto& kick : kicks_) signal_eventfd(kick.load());
}

void KernelRingEvents::relay_kick(uint16_t ring) const {
  if (ring < kicks_.size()) signal_eventfd(kicks_[ring].load());
}

}  // namespace kiln::devices::virtio
