// libFuzzer target: virtio-net's transmit, receive and control paths over rings taken from the
// fuzz input,
// with a datagram socketpair standing in for the tap and a few host frames waiting to be
// received. Whatever the guest's descriptors say, the device must only touch guest RAM.
//
// Input: [0..1] queue size, [2] flags (bit 0 indirect, bit 1 event idx, bit 2 receive
// offloads, bit 3 merged receive buffers, bit 4 one host frame of 40000 bytes more, longer
// than the RAM, bit 5 a control queue), [3] host frames to queue (low 3 bits), then the
// transmit queue's descriptor table, avail and used ring offsets, the receive queue's and the
// control queue's (nine 16-bit values, in 16-byte units inside the RAM), then the initial RAM
// contents.
#include <spdlog/spdlog.h>
#include <sys/socket.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "base/event_loop.h"
#include "devices/virtio/queue.h"
#include "devices/virtio/test_support.h"
#include "devices/virtio/virtio_net.h"

namespace {

using namespace kiln;
using namespace kiln::devices::virtio;

constexpr uint64_t kRamSize = 64 * 1024;
constexpr size_t kHeaderSize = 22;

const memory::GuestMemory& ram() {
  static memory::GuestMemory memory = memory::GuestMemory::create_ram(kRamSize);
  return memory;
}

uint16_t get16(const uint8_t* p) { return uint16_t(p[0] | p[1] << 8); }

class SocketBackend : public NetBackend {
 public:
  explicit SocketBackend(int fd) : fd_(fd) {}
  int fd() const override { return fd_.get(); }
  bool set_offloads(uint32_t) override { return true; }

 private:
  UniqueFd fd_;
};

void configure(Queue& queue, const uint8_t* header, const uint8_t* offsets) {
  queue.set_size(get16(header));
  queue.set_desc_table(uint64_t(get16(offsets)) * 16);
  queue.set_avail_ring(uint64_t(get16(offsets + 2)) * 16);
  queue.set_used_ring(uint64_t(get16(offsets + 4)) * 16);
  queue.set_features(header[2] & 1, header[2] & 2);
  queue.set_ready(true);
}

void run_net(const uint8_t* header) {
  // Not running: the device registers the backend with it, and we call process_queue directly.
  static EventLoop loop;
  int pair[2];
  if (socketpair(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, pair) < 0) return;
  UniqueFd peer(pair[1]);
  VirtioNet net(std::make_unique<SocketBackend>(pair[0]), default_mac("fuzz"), loop);
  std::vector<Queue> queues;
  for (int i = 0; i < 3; ++i) queues.emplace_back(256);
  configure(queues[kNetReceiveQueue], header, header + 10);
  configure(queues[kNetTransmitQueue], header, header + 4);
  const bool control = header[2] & 32;
  if (control) configure(queues[kNetControlQueue], header, header + 16);
  for (Queue& queue : queues)
    if (queue.ready() && queue.activate(ram())) return;
  for (int i = 0; i < (header[3] & 7); ++i) {
    std::vector<uint8_t> frame(kNetHeaderSize + 60 + 700 * i, uint8_t(i));
    [[maybe_unused]] ssize_t sent = send(peer.get(), frame.data(), frame.size(), 0);
  }
  if (header[2] & 16) {
    std::vector<uint8_t> frame(kNetHeaderSize + 40000, 0x5a);
    [[maybe_unused]] ssize_t sent = send(peer.get(), frame.data(), frame.size(), 0);
  }
  testing::FakeInterrupt interrupt;
  uint64_t features = net.device_features();
  if (!(header[2] & 4)) features &= ~(kNetFeatureGuestCsum | kNetFeatureGuestTso4);
  if (!(header[2] & 8)) features &= ~kNetFeatureMrgRxbuf;
  if (!control) features &= ~(kNetFeatureCtrlVq | kNetFeatureCtrlGuestOffloads);
  VirtioActivation activation{&ram(), queues, &interrupt, features, {}};
  if (!net.activate(activation)) return;
  net.process_queue(kNetControlQueue);  // does nothing without the queue
  net.process_queue(kNetTransmitQueue);
  net.process_queue(kNetReceiveQueue);
  // Again, as after a driver's kick: a frame kept for want of buffers is retried.
  net.process_queue(kNetReceiveQueue);
  std::vector<uint8_t> buffer(70000);
  while (recv(peer.get(), buffer.data(), buffer.size(), 0) > 0) {
  }
  net.reset();
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  spdlog::set_level(spdlog::level::off);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < kHeaderSize) return 0;
  auto all = *ram().slice(0, kRamSize);
  std::memset(all.data(), 0, all.size());
  std::memcpy(all.data(), data + kHeaderSize, std::min<size_t>(size - kHeaderSize, kRamSize));
  run_net(data);
  return 0;
}
