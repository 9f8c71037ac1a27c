// Test doubles and a driver-side view of a split virtqueue, for unit tests and the fuzzer.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "devices/irq.h"
#include "devices/virtio/queue.h"
#include "devices/virtio/virtio_device.h"
#include "memory/guest_memory.h"

namespace kiln::devices::virtio::testing {

// MSI vectors that count what they were asked to do.
class FakeMsiVector : public MsiVector {
 public:
  void configure(uint64_t address, uint32_t data, bool masked) override {
    std::lock_guard lock(mutex);
    this->address = address;
    this->data = data;
    this->masked = masked;
    ++configures;
  }
  void trigger() override { triggers++; }
  int eventfd() const override { return direct_fd; }
  // Waits until the vector has fired at least `count` times. A device worker publishes the used
  // ring before it raises the interrupt, so a test that saw the used index move must still wait.
  bool wait_triggers(int count, std::chrono::milliseconds timeout = std::chrono::seconds(5)) const {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (triggers.load() < count) {
      if (std::chrono::steady_clock::now() >= deadline) return false;
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    return true;
  }
  bool take_pending() override {
    std::lock_guard lock(mutex);
    return masked && std::exchange(held_signals, 0) > 0;
  }

  std::mutex mutex;
  uint64_t address = 0;
  uint32_t data = 0;
  bool masked = true;
  int configures = 0;
  std::atomic<int> triggers{0};
  int direct_fd = -1;    // what eventfd() reports (an irqfd under KVM)
  int held_signals = 0;  // kernel signals on direct_fd that a mask held back
};

class FakeMsiAllocator : public MsiAllocator {
 public:
  std::unique_ptr<MsiVector> allocate() override {
    auto vector = std::make_unique<FakeMsiVector>();
    vectors.push_back(vector.get());
    return vector;
  }
  std::vector<FakeMsiVector*> vectors;
};

// Records the interrupts a device model raises (device tests without a transport).
class FakeInterrupt : public VirtioInterrupt {
 public:
  void signal_queue(uint16_t) override { queue_signals++; }
  void signal_config_change() override { config_signals++; }
  void needs_reset(const std::string& why) override {
    std::lock_guard lock(mutex);
    reset_reasons.push_back(why);
  }
  size_t resets() {
    std::lock_guard lock(mutex);
    return reset_reasons.size();
  }
  std::atomic<int> queue_signals{0};
  std::atomic<int> config_signals{0};
  std::mutex mutex;
  std::vector<std::string> reset_reasons;
};

// The driver's side of one split virtqueue laid out at fixed guest addresses.
class DriverQueue {
 public:
  struct Buffer {
    uint64_t gpa;
    uint32_t len;
    bool writable;
  };

  DriverQueue(const memory::GuestMemory& memory, uint16_t size, uint64_t desc, uint64_t avail,
              uint64_t used)
      : memory_(memory), size_(size), desc_(desc), avail_(avail), used_(used) {
    std::vector<uint8_t> zeros(16 * size + 6 + 2 * size + 6 + 8 * size, 0);
    memory_.write(desc_, {zeros.data(), 16u * size});
    memory_.write(avail_, {zeros.data(), 6u + 2 * size});
    memory_.write(used_, {zeros.data(), 6u + 8 * size});
  }

  uint16_t size() const { return size_; }
  uint64_t desc() const { return desc_; }
  uint64_t avail() const { return avail_; }
  uint64_t used() const { return used_; }

  void write_descriptor(uint64_t table, uint16_t index, uint64_t addr, uint32_t len, uint16_t flags,
                        uint16_t next) {
    uint8_t raw[16];
    std::memcpy(raw, &addr, 8);
    std::memcpy(raw + 8, &len, 4);
    std::memcpy(raw + 12, &flags, 2);
    std::memcpy(raw + 14, &next, 2);
    memory_.write(table + 16ull * index, raw);
  }

  // Writes `buffers` as a chain in the descriptor table starting at `first`, publishes the head
  // and returns it.
  uint16_t add_chain(const std::vector<Buffer>& buffers, uint16_t first) {
    for (size_t i = 0; i < buffers.size(); ++i) {
      uint16_t index = uint16_t((first + i) % size_);
      bool last = i + 1 == buffers.size();
      uint16_t flags =
          uint16_t((buffers[i].writable ? kDescFlagWrite : 0) | (last ? 0 : kDescFlagNext));
      write_descriptor(desc_, index, buffers[i].gpa, buffers[i].len, flags,
                       uint16_t((index + 1) % size_));
    }
    publish(first);
    return first;
  }

  // Puts a single indirect descriptor at `slot` pointing at a table at `table_gpa`.
  uint16_t add_indirect_chain(const std::vector<Buffer>& buffers, uint16_t slot,
                              uint64_t table_gpa) {
    for (size_t i = 0; i < buffers.size(); ++i) {
      bool last = i + 1 == buffers.size();
      uint16_t flags =
          uint16_t((buffers[i].writable ? kDescFlagWrite : 0) | (last ? 0 : kDescFlagNext));
      write_descriptor(table_gpa, uint16_t(i), buffers[i].gpa, buffers[i].len, flags,
                       uint16_t(i + 1));
    }
    write_descriptor(desc_, slot, table_gpa, uint32_t(16 * buffers.size()), kDescFlagIndirect, 0);
    publish(slot);
    return slot;
  }

  void publish(uint16_t head) {
    uint16_t idx = avail_idx();
    memory_.write_obj<uint16_t>(avail_ + 4 + 2ull * (idx % size_), head);
    set_avail_idx(uint16_t(idx + 1));
  }

  uint16_t avail_idx() const { return *memory_.read_obj<uint16_t>(avail_ + 2); }
  void set_avail_idx(uint16_t idx) {
    std::atomic_thread_fence(std::memory_order_release);
    memory_.write_obj<uint16_t>(avail_ + 2, idx);
  }
  void set_avail_flags(uint16_t flags) { memory_.write_obj<uint16_t>(avail_, flags); }
  void set_used_event(uint16_t idx) { memory_.write_obj<uint16_t>(avail_ + 4 + 2ull * size_, idx); }
  uint16_t avail_event() const { return *memory_.read_obj<uint16_t>(used_ + 4 + 8ull * size_); }

  uint16_t used_idx() const {
    auto value = *memory_.read_obj<uint16_t>(used_ + 2);
    std::atomic_thread_fence(std::memory_order_acquire);
    return value;
  }
  std::pair<uint32_t, uint32_t> used_element(uint16_t i) const {
    uint64_t at = used_ + 4 + 8ull * (i % size_);
    return {*memory_.read_obj<uint32_t>(at), *memory_.read_obj<uint32_t>(at + 4)};
  }

 private:
  const memory::GuestMemory& memory_;
  uint16_t size_;
  uint64_t desc_, avail_, used_;
};

}  // namespace kiln::devices::virtio::testing
