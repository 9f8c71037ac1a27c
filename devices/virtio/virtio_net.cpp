#include "devices/virtio/virtio_net.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <sys/uio.h>

#include <cctype>
#include <cerrno>
#include <climits>
#include <cstring>

#include "devices/virtio/chain_buffers.h"

namespace kiln::devices::virtio {
namespace {

// Frames moved per wake-up before the loop gets a chance to serve the other queues.
constexpr int kReceiveBudget = 256;

bool acked(const VirtioActivation& activation, uint64_t feature) {
  return activation.acked_features & feature;
}

}  // namespace

MacAddress default_mac(const std::string& tap) {
  // FNV-1a: stable across builds and hosts, unlike std::hash.
  uint32_t hash = 2166136261u;
  for (unsigned char c : tap) hash = (hash ^ c) * 16777619u;
  return {0x52, 0x54, 0x00, uint8_t(hash >> 16), uint8_t(hash >> 8), uint8_t(hash)};
}

std::string format_mac(const MacAddress& mac) {
  return fmt::format("{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", mac[0], mac[1], mac[2], mac[3],
                     mac[4], mac[5]);
}

std::optional<MacAddress> parse_mac(const std::string& text) {
  MacAddress mac;
  if (text.size() != 17) return std::nullopt;
  for (size_t i = 0; i < mac.size(); ++i) {
    if (i > 0 && text[3 * i - 1] != ':') return std::nullopt;
    unsigned value = 0;
    for (char c : text.substr(3 * i, 2)) {
      int digit = std::isdigit(static_cast<unsigned char>(c)) ? c - '0'
                  : std::isxdigit(static_cast<unsigned char>(c))
                      ? std::tolower(static_cast<unsigned char>(c)) - 'a' + 10
                      : -1;
      if (digit < 0) return std::nullopt;
      value = value * 16 + unsigned(digit);
    }
    mac[i] = uint8_t(value);
  }
  return mac;
}

VirtioNet::VirtioNet(std::unique_ptr<NetBackend> backend, const MacAddress& mac, EventLoop& loop)
    : backend_(std::move(backend)), mac_(mac), loop_(loop) {}

VirtioNet::~VirtioNet() {
  // The loop must stop calling us before the backend's fd is closed with the members.
  if (watching_) loop_.remove(backend_->fd());
  const NetMetrics& m = metrics_;
  spdlog::debug(
      "virtio-net {}: tx {} frames {} bytes {} dropped, {} kicks {} interrupts; rx {} frames {} "
      "bytes, {} tap wake-ups {} kicks {} interrupts, {} pauses, {} bad buffers",
      format_mac(mac_), m.tx_packets.load(), m.tx_bytes.load(), m.tx_dropped.load(),
      m.tx_kicks.load(), m.tx_interrupts.load(), m.rx_packets.load(), m.rx_bytes.load(),
      m.rx_wakeups.load(), m.rx_kicks.load(), m.rx_interrupts.load(), m.rx_pauses.load(),
      m.rx_bad_buffers.load());
}

uint64_t VirtioNet::device_features() const {
  // Transmit offloads are always safe to offer: the tap (IFF_VNET_HDR) takes partial checksums
  // and GSO frames and finishes them in software if the host's path needs it. Receive
  // offloads are given to the tap only once the guest accepts them (activate()).
  return kFeatureVersion1 | kFeatureRingIndirectDesc | kFeatureRingEventIdx | kNetFeatureMac |
         kNetFeatureStatus | kNetFeatureCsum | kNetFeatureHostTso4 | kNetFeatureHostTso6 |
         kNetFeatureHostEcn | kNetFeatureGuestCsum | kNetFeatureGuestTso4 | kNetFeatureGuestTso6 |
         kNetFeatureGuestEcn;
}

void VirtioNet::read_config(uint64_t offset, std::span<uint8_t> data) {
  uint8_t image[kNetConfigSize] = {};
  std::memcpy(image, mac_.data(), mac_.size());
  image[6] = kNetStatusLinkUp;  // status (little-endian u16)
  image[8] = 1;                 // max_virtqueue_pairs
  for (size_t i = 0; i < data.size(); ++i)
    data[i] = offset + i < kNetConfigSize ? image[offset + i] : 0;
}

bool VirtioNet::activate(const VirtioActivation& activation) {
  std::lock_guard lock(mutex_);
  if (activation.queues.size() != 2) return false;
  uint32_t offloads = 0;
  if (acked(activation, kNetFeatureGuestCsum)) {
    offloads |= kTunOffloadCsum;
    if (acked(activation, kNetFeatureGuestTso4)) offloads |= kTunOffloadTso4;
    if (acked(activation, kNetFeatureGuestTso6)) offloads |= kTunOffloadTso6;
    if (acked(activation, kNetFeatureGuestEcn) && (offloads & (kTunOffloadTso4 | kTunOffloadTso6)))
      offloads |= kTunOffloadTsoEcn;
  }
  if (!backend_->set_offloads(offloads)) {
    log_.warn(fmt::format("virtio-net: the tap refused offloads {:#x}", offloads));
    return false;
  }
  offloads_ = offloads;
  activation_ = activation;
  active_ = true;
  // Frames the tap queued before the driver came up are read as soon as there are buffers.
  watch_backend_locked();
  return true;
}

void VirtioNet::reset() {
  bool was_watching;
  {
    std::lock_guard lock(mutex_);
    active_ = false;
    was_watching = watching_;
    watching_ = false;
    activation_ = {};
  }
  // Outside our lock: remove() waits for a running callback, which may be waiting for it.
  if (was_watching) loop_.remove(backend_->fd());
  backend_->set_offloads(0);
  offloads_ = 0;
}

void VirtioNet::watch_backend_locked() {
  if (watching_) return;
  watching_ = true;
  loop_.add(backend_->fd(), [this](uint32_t) {
    std::lock_guard lock(mutex_);
    metrics_.rx_wakeups++;
    if (active_) receive_locked();
  });
}

void VirtioNet::unwatch_backend_locked() {
  if (!watching_) return;
  watching_ = false;
  loop_.remove(backend_->fd());  // on the loop thread: does not wait
}

void VirtioNet::process_queue(uint16_t queue) {
  std::lock_guard lock(mutex_);
  if (!active_) return;
  if (queue == kNetTransmitQueue) {
    metrics_.tx_kicks++;
    transmit_locked();
  }
  if (queue == kNetReceiveQueue) {
    metrics_.rx_kicks++;
    // New receive buffers: take the tap back if we had let go of it, and fill them now.
    watch_backend_locked();
    receive_locked();
  }
}

void VirtioNet::transmit_locked() {
  Queue& queue = activation_.queues[kNetTransmitQueue];
  if (!queue.ready()) return;
  const memory::GuestMemory& memory = *activation_.memory;
  bool used = false;
  do {
    DescriptorChain chain;
    Queue::PopStatus status;
    while ((status = queue.pop(memory, chain)) == Queue::PopStatus::kChain) {
      ChainBuffers frame(chain, false);
      if (frame.size() < kNetHeaderSize || frame.size() > kNetHeaderSize + kNetMaxFrame) {
        log_.warn(fmt::format("virtio-net: dropping a transmit buffer of {} bytes", frame.size()));
        metrics_.tx_dropped++;
      } else {
        auto iov = frame.iovecs(0, frame.size());
        ssize_t sent = iov.size() <= IOV_MAX ? ::writev(backend_->fd(), iov.data(), int(iov.size()))
                                             : (errno = EMSGSIZE, -1);
        if (sent < 0) {
          // Like a NIC with a full or downed link: the frame is lost, the guest's TCP resends.
          metrics_.tx_dropped++;
          if (errno != EAGAIN && errno != EIO)
            log_.warn(fmt::format("virtio-net: tap write failed: {}", std::strerror(errno)));
        } else {
          metrics_.tx_packets++;
          metrics_.tx_bytes += frame.size() - kNetHeaderSize;
        }
      }
      if (!queue.add_used(memory, chain.head, 0)) {
        activation_.interrupt->needs_reset("virtio-net: transmit used ring unwritable");
        return;
      }
      used = true;
    }
    if (status == Queue::PopStatus::kError) {
      activation_.interrupt->needs_reset("virtio-net transmitq: " + queue.error());
      return;
    }
  } while (queue.enable_notification());
  if (used && queue.needs_notification()) {
    metrics_.tx_interrupts++;
    activation_.interrupt->signal_queue(kNetTransmitQueue);
  }
}

void VirtioNet::receive_locked() {
  Queue& queue = activation_.queues[kNetReceiveQueue];
  if (!queue.ready()) {
    unwatch_backend_locked();
    return;
  }
  const memory::GuestMemory& memory = *activation_.memory;
  bool used = false;
  for (int budget = kReceiveBudget; budget > 0; --budget) {
    DescriptorChain chain;
    Queue::PopStatus status = queue.pop(memory, chain);
    if (status == Queue::PopStatus::kError) {
      unwatch_backend_locked();
      activation_.interrupt->needs_reset("virtio-net receiveq: " + queue.error());
      return;
    }
    if (status == Queue::PopStatus::kEmpty) {
      // Re-arm the guest's kick and look once more: buffers posted in between must not wait.
      if (queue.enable_notification()) continue;
      // Nowhere to put frames: stop watching the tap until the guest posts buffers.
      metrics_.rx_pauses++;
      unwatch_backend_locked();
      break;
    }
    ChainBuffers buffers(chain, true);
    auto iov = buffers.iovecs(0, buffers.size());
    if (buffers.size() < kNetHeaderSize || iov.size() > IOV_MAX) {
      log_.warn(fmt::format("virtio-net: unusable receive buffer ({} bytes in {} pieces)",
                            buffers.size(), iov.size()));
      metrics_.rx_bad_buffers++;
      if (!queue.add_used(memory, chain.head, 0)) break;
      used = true;
      continue;
    }
    ssize_t got = ::readv(backend_->fd(), iov.data(), int(iov.size()));
    if (got < ssize_t(kNetHeaderSize)) {
      queue.undo_pop();  // the buffer stays the guest's for the next frame
      if (got < 0 && errno != EAGAIN && errno != EINTR) {
        log_.warn(fmt::format("virtio-net: tap read failed: {}", std::strerror(errno)));
        unwatch_backend_locked();
      }
      break;
    }
    // The tap leaves num_buffers alone; without VIRTIO_NET_F_MRG_RXBUF it is 1 (spec 5.1.6.3).
    const uint8_t one[2] = {1, 0};
    buffers.write(memory, kNetNumBuffersOffset, one);
    buffers.mark_dirty(memory, 0, uint64_t(got));
    metrics_.rx_packets++;
    metrics_.rx_bytes += uint64_t(got) - kNetHeaderSize;
    if (!queue.add_used(memory, chain.head, uint32_t(got))) {
      unwatch_backend_locked();
      activation_.interrupt->needs_reset("virtio-net: receive used ring unwritable");
      return;
    }
    used = true;
  }
  if (used && queue.needs_notification()) {
    metrics_.rx_interrupts++;
    activation_.interrupt->signal_queue(kNetReceiveQueue);
  }
}

}  // namespace kiln::devices::virtio
