#include "devices/virtio/virtio_rng.h"

#include <sys/random.h>

#include <cerrno>

namespace kiln::devices::virtio {
namespace {

// Fills `buffer` completely from the kernel's CSPRNG; false on an unexpected failure.
bool fill_random(uint8_t* buffer, size_t length) {
  size_t done = 0;
  while (done < length) {
    ssize_t got = getrandom(buffer + done, length - done, 0);
    if (got < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    done += size_t(got);
  }
  return true;
}

}  // namespace

bool VirtioRng::activate(const VirtioActivation& activation) {
  std::lock_guard lock(mutex_);
  if (activation.queues.size() != 1) return false;
  activation_ = activation;
  active_ = true;
  return true;
}

void VirtioRng::reset() {
  std::lock_guard lock(mutex_);
  active_ = false;
  activation_ = {};
}

void VirtioRng::process_queue(uint16_t index) {
  std::lock_guard lock(mutex_);
  if (!active_ || index != 0 || !activation_.queues[0].ready()) return;
  Queue& queue = activation_.queues[0];
  const memory::GuestMemory& memory = *activation_.memory;
  bool notify = false;
  do {
    DescriptorChain chain;
    Queue::PopStatus status;
    while ((status = queue.pop(memory, chain)) == Queue::PopStatus::kChain) {
      metrics_.requests++;
      uint32_t written = 0;
      for (const Descriptor& d : chain.descriptors) {
        if (!d.writable) continue;  // the driver only gives writable buffers; ignore others
        if (!fill_random(d.host, d.len)) {
          metrics_.errors++;
          log_.warn("virtio-rng: getrandom failed");
          break;
        }
        memory.mark_dirty(d.gpa, d.len);
        written += d.len;
      }
      metrics_.bytes += written;
      if (!queue.add_used(memory, chain.head, written)) {
        activation_.interrupt->needs_reset("virtio-rng: used ring unwritable");
        return;
      }
      notify = true;
    }
    if (status == Queue::PopStatus::kError) {
      activation_.interrupt->needs_reset("virtio-rng: " + queue.error());
      break;
    }
  } while (queue.enable_notification());
  if (notify && queue.needs_notification()) activation_.interrupt->signal_queue(0);
}

}  // namespace kiln::devices::virtio
