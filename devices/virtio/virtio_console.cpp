#include "devices/virtio/virtio_console.h"

#include <algorithm>
#include <stdexcept>
#include <vector>

namespace kiln::devices::virtio {

void VirtioConsole::read_config(uint64_t offset, std::span<uint8_t> data) {
  // cols = rows = 0 (no size feature), max_nr_ports = 1, emerg_wr = 0.
  uint8_t image[kConsoleConfigSize] = {0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0};
  for (size_t i = 0; i < data.size(); ++i)
    data[i] = offset + i < kConsoleConfigSize ? image[offset + i] : 0;
}

bool VirtioConsole::activate(const VirtioActivation& activation) {
  std::lock_guard lock(mutex_);
  if (activation.queues.size() != 2) return false;
  activation_ = activation;
  active_ = true;
  // Input typed before the driver came up waits for the guest to post receive buffers and
  // notify; nothing touches the rings here, on the vCPU thread.
  return true;
}

void VirtioConsole::reset() {
  std::lock_guard lock(mutex_);
  active_ = false;
  activation_ = {};
}

void VirtioConsole::process_queue(uint16_t queue) {
  std::lock_guard lock(mutex_);
  if (!active_) return;
  if (queue == kConsoleTransmitQueue) transmit_locked();
  if (queue == kConsoleReceiveQueue) deliver_input_locked();
}

void VirtioConsole::enqueue_input(std::span<const uint8_t> bytes) {
  std::lock_guard lock(mutex_);
  size_t room = kMaxPendingInput - std::min(kMaxPendingInput, pending_input_.size());
  size_t taken = std::min(room, bytes.size());
  pending_input_.insert(pending_input_.end(), bytes.begin(), bytes.begin() + taken);
  metrics_.rx_dropped += bytes.size() - taken;
  if (active_) deliver_input_locked();
}

ConsoleState VirtioConsole::save() {
  std::lock_guard lock(mutex_);
  ConsoleState state;
  state.pending_input.assign(pending_input_.begin(), pending_input_.end());
  return state;
}

void VirtioConsole::restore(const ConsoleState& state) {
  if (state.version != ConsoleState::kVersion)
    throw std::invalid_argument("unsupported virtio-console state version");
  std::lock_guard lock(mutex_);
  pending_input_.assign(state.pending_input.begin(), state.pending_input.end());
}

void VirtioConsole::transmit_locked() {
  Queue& queue = activation_.queues[kConsoleTransmitQueue];
  if (!queue.ready()) return;
  const memory::GuestMemory& memory = *activation_.memory;
  bool used = false;
  std::vector<uint8_t> output;
  do {
    DescriptorChain chain;
    Queue::PopStatus status;
    while ((status = queue.pop(memory, chain)) == Queue::PopStatus::kChain) {
      output.clear();
      for (const Descriptor& d : chain.descriptors)
        if (!d.writable) output.insert(output.end(), d.host, d.host + d.len);
      metrics_.tx_bytes += output.size();
      if (sink_ && !output.empty()) sink_(output);
      if (!queue.add_used(memory, chain.head, 0)) {
        activation_.interrupt->needs_reset("virtio-console: used ring unwritable");
        return;
      }
      used = true;
    }
    if (status == Queue::PopStatus::kError) {
      activation_.interrupt->needs_reset("virtio-console transmitq: " + queue.error());
      return;
    }
  } while (queue.enable_notification());
  if (used && queue.needs_notification())
    activation_.interrupt->signal_queue(kConsoleTransmitQueue);
}

void VirtioConsole::deliver_input_locked() {
  Queue& queue = activation_.queues[kConsoleReceiveQueue];
  if (!queue.ready()) return;
  const memory::GuestMemory& memory = *activation_.memory;
  bool used = false;
  // Only take a receive buffer when there is something to put in it.
  while (!pending_input_.empty()) {
    DescriptorChain chain;
    Queue::PopStatus status = queue.pop(memory, chain);
    if (status == Queue::PopStatus::kError) {
      activation_.interrupt->needs_reset("virtio-console receiveq: " + queue.error());
      return;
    }
    if (status == Queue::PopStatus::kEmpty) break;
    uint32_t written = 0;
    for (const Descriptor& d : chain.descriptors) {
      if (!d.writable) continue;
      size_t n = std::min<size_t>(d.len, pending_input_.size());
      std::copy_n(pending_input_.begin(), n, d.host);
      pending_input_.erase(pending_input_.begin(), pending_input_.begin() + n);
      memory.mark_dirty(d.gpa, n);
      written += uint32_t(n);
    }
    metrics_.rx_bytes += written;
    if (!queue.add_used(memory, chain.head, written)) {
      activation_.interrupt->needs_reset("virtio-console: used ring unwritable");
      return;
    }
    used = true;
  }
  queue.enable_notification();
  if (used && queue.needs_notification()) activation_.interrupt->signal_queue(kConsoleReceiveQueue);
}

}  // namespace kiln::devices::virtio
