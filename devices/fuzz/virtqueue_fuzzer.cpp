// libFuzzer target: guest memory and a queue's configuration come from the fuzz input; the
// virtqueue walker, virtio-blk request handling and virtio-balloon's page lists must survive
// anything in it.
//
// Input: [0..1] queue size, [2] flags (bit 0 indirect, bit 1 event idx, bit 2 read-only
// disk), [3] the balloon queue to feed (mod 3), [4..5] descriptor table offset, [6..7] avail ring
// offset, [8..9] used ring offset (all in 16-byte units inside the RAM), then the initial RAM
// contents.
#include <spdlog/spdlog.h>

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "devices/virtio/memory_disk.h"
#include "devices/virtio/queue.h"
#include "devices/virtio/test_support.h"
#include "devices/virtio/virtio_balloon.h"
#include "devices/virtio/virtio_blk.h"

namespace {

using namespace kiln;
using namespace kiln::devices::virtio;

constexpr uint64_t kRamSize = 64 * 1024;
constexpr size_t kHeaderSize = 10;

const memory::GuestMemory& ram() {
  static memory::GuestMemory memory = memory::GuestMemory::create_ram(kRamSize);
  return memory;
}

uint16_t get16(const uint8_t* p) { return uint16_t(p[0] | p[1] << 8); }

void configure(Queue& queue, const uint8_t* header) {
  queue.set_size(get16(header));
  queue.set_desc_table(uint64_t(get16(header + 4)) * 16);
  queue.set_avail_ring(uint64_t(get16(header + 6)) * 16);
  queue.set_used_ring(uint64_t(get16(header + 8)) * 16);
  queue.set_features(header[2] & 1, header[2] & 2);
  queue.set_ready(true);
}

void load_ram(const uint8_t* data, size_t size) {
  auto all = *ram().slice(0, kRamSize);
  std::memset(all.data(), 0, all.size());
  std::memcpy(all.data(), data, std::min<size_t>(size, kRamSize));
}

// Walks every chain the driver published and returns each to the used ring.
void run_walker(const uint8_t* header) {
  Queue queue(256);
  configure(queue, header);
  if (queue.activate(ram())) return;
  DescriptorChain chain;
  for (int i = 0; i < 512 && queue.pop(ram(), chain) == Queue::PopStatus::kChain; ++i) {
    uint64_t total = 0;
    for (const Descriptor& d : chain.descriptors) {
      // Touch every byte the walker vouched for: ASan flags anything outside guest RAM.
      if (d.len) total += d.host[0] + d.host[d.len - 1];
    }
    queue.add_used(ram(), chain.head, uint32_t(total));
    queue.needs_notification();
  }
  queue.enable_notification();
}

// Feeds the same rings to virtio-blk over an in-memory disk.
void run_block(const uint8_t* header) {
  static auto disk = std::make_shared<testing::MemoryDisk>(256 * 1024);
  static auto read_only_disk = std::make_shared<testing::MemoryDisk>(256 * 1024, true);
  VirtioBlock block(header[2] & 4 ? read_only_disk : disk,
                    BlockConfig{.serial = "fuzz", .num_queues = 1, .queue_size = 256});
  Queue queue(256);
  configure(queue, header);
  if (queue.activate(ram())) return;
  testing::FakeInterrupt interrupt;
  VirtioActivation activation{
      &ram(), std::span<Queue>(&queue, 1), &interrupt, block.device_features(), {}};
  if (!block.activate(activation)) return;
  block.process_queue(0);
  block.reset();
}

// Feeds the rings to virtio-balloon's inflate, deflate or stats queue (inflate releases the
// pages it is given, so the RAM is reloaded before each run).
void run_balloon(const uint8_t* header) {
  VirtioBalloon balloon(kRamSize);
  Queue queues[3] = {Queue(256), Queue(256), Queue(256)};
  for (Queue& queue : queues) {
    configure(queue, header);
    if (queue.activate(ram())) return;
  }
  testing::FakeInterrupt interrupt;
  VirtioActivation activation{
      &ram(), std::span<Queue>(queues, 3), &interrupt, balloon.device_features(), {}};
  if (!balloon.activate(activation)) return;
  balloon.process_queue(uint16_t(header[3] % 3));
  balloon.request_stats();
  balloon.reset();
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  spdlog::set_level(spdlog::level::off);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < kHeaderSize) return 0;
  load_ram(data + kHeaderSize, size - kHeaderSize);
  run_walker(data);
  load_ram(data + kHeaderSize, size - kHeaderSize);
  run_block(data);
  load_ram(data + kHeaderSize, size - kHeaderSize);
  run_balloon(data);
  return 0;
}
