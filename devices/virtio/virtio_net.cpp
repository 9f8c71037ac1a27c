#include "devices/virtio/virtio_net.h"

#include <endian.h>
#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <climits>
#include <cstring>
#include <stdexcept>
#include <system_error>
#include <utility>
#include <vector>

#include "devices/virtio/chain_buffers.h"

namespace kiln::devices::virtio {
namespace {

// Frames moved per wake-up before the loop gets a chance to serve the other queues.
constexpr int kReceiveBudget = 256;
// Times one look for receive buffers re-arms the guest's kick and finds the ring changed: a
// driver moving its avail index back and forth must not keep the device looping.
constexpr int kRearmLimit = 16;

// What virtio-net itself offers whichever data path runs the rings. Transmit offloads are
// always safe to offer: the tap (IFF_VNET_HDR) takes partial checksums and GSO frames and
// finishes them in software if the host's path needs it. Receive offloads are given to the tap
// only once the guest accepts them (activate()).
constexpr uint64_t kNetDeviceFeatures =
    kNetFeatureMac | kNetFeatureStatus | kNetFeatureCsum | kNetFeatureHostTso4 |
    kNetFeatureHostTso6 | kNetFeatureHostEcn | kNetFeatureGuestCsum | kNetFeatureGuestTso4 |
    kNetFeatureGuestTso6 | kNetFeatureGuestEcn | kNetFeatureCtrlVq | kNetFeatureCtrlGuestOffloads;
// The receive offloads the driver may switch with VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET, whose
// bitmap uses the feature bits' numbers.
constexpr uint64_t kGuestOffloadFeatures =
    kNetFeatureGuestCsum | kNetFeatureGuestTso4 | kNetFeatureGuestTso6 | kNetFeatureGuestEcn;
// Ring features of either data path, the kernel's masked with what it reports. Merged receive
// buffers let one 64 KiB GSO frame span several small buffers, so the driver need not post a
// 64 KiB buffer per receive descriptor.
constexpr uint64_t kUserspaceRingFeatures =
    kFeatureVersion1 | kFeatureRingIndirectDesc | kFeatureRingEventIdx | kNetFeatureMrgRxbuf;
constexpr uint64_t kKernelRingFeatures = kUserspaceRingFeatures;
// The longest frame the tap may deliver, virtio_net_hdr included.
constexpr uint64_t kMaxReceive = kNetHeaderSize + kNetMaxFrame;

bool acked(const VirtioActivation& activation, uint64_t feature) {
  return activation.acked_features & feature;
}

// The tap's offload flags for guest receive offloads given as feature bits. Segmentation and
// ECN mean nothing to the tap without checksum offload, ECN nothing without segmentation.
uint32_t tap_offloads(uint64_t guest_offloads) {
  if (!(guest_offloads & kNetFeatureGuestCsum)) return 0;
  uint32_t flags = kTunOffloadCsum;
  if (guest_offloads & kNetFeatureGuestTso4) flags |= kTunOffloadTso4;
  if (guest_offloads & kNetFeatureGuestTso6) flags |= kTunOffloadTso6;
  if ((guest_offloads & kNetFeatureGuestEcn) && (flags & (kTunOffloadTso4 | kTunOffloadTso6)))
    flags |= kTunOffloadTsoEcn;
  return flags;
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

VirtioNet::VirtioNet(std::unique_ptr<NetBackend> backend, const MacAddress& mac, EventLoop& loop,
                     std::unique_ptr<NetKernelDatapath> kernel)
    : backend_(std::move(backend)), mac_(mac), loop_(loop), kernel_(std::move(kernel)) {
  if (!kernel_) return;
  kernel_features_ = kernel_->features();
  if (!(kernel_features_ & kFeatureVersion1))
    throw std::invalid_argument("virtio-net: the kernel data path cannot do VIRTIO_F_VERSION_1");
  events_ = std::make_unique<KernelRingEvents>(loop_, 2, "virtio-net");
}

VirtioNet::~VirtioNet() {
  // The loop must stop calling us before the backend's fd is closed with the members.
  if (watching_) loop_.remove(backend_->fd());
  {
    // The transport may be half gone: no interrupts, no write-back into its queues.
    std::lock_guard lock(mutex_);
    activation_ = {};
    {
      std::lock_guard control_lock(control_mutex_);
      control_.reset();
    }
    stop_kernel_locked();
  }
  const NetMetrics& m = metrics_;
  spdlog::debug(
      "virtio-net {}: tx {} frames {} bytes {} dropped, {} kicks {} interrupts; rx {} frames {} "
      "bytes {} dropped, {} tap wake-ups {} kicks {} interrupts, {} pauses, {} bad buffers; {} "
      "kernel "
      "data path starts ({} rings with direct kicks, {} with direct interrupts); {} control "
      "commands, {} refused",
      format_mac(mac_), m.tx_packets.load(), m.tx_bytes.load(), m.tx_dropped.load(),
      m.tx_kicks.load(), m.tx_interrupts.load(), m.rx_packets.load(), m.rx_bytes.load(),
      m.rx_dropped.load(), m.rx_wakeups.load(), m.rx_kicks.load(), m.rx_interrupts.load(),
      m.rx_pauses.load(), m.rx_bad_buffers.load(), m.kernel_starts.load(),
      m.kernel_direct_kicks.load(), m.kernel_direct_calls.load(), m.control_commands.load(),
      m.control_errors.load());
}

uint64_t VirtioNet::device_features() const {
  if (kernel_) return kNetDeviceFeatures | (kernel_features_ & kKernelRingFeatures);
  return kNetDeviceFeatures | kUserspaceRingFeatures;
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
  if (activation.queues.size() != num_queues()) return false;
  // Negotiated receive offloads start enabled (spec 5.1.6.5.6.1).
  const uint32_t offloads = tap_offloads(activation.acked_features);
  if (!backend_->set_offloads(offloads)) {
    log_.warn(fmt::format("virtio-net: the tap refused offloads {:#x}", offloads));
    return false;
  }
  offloads_ = offloads;
  merge_ = acked(activation, kNetFeatureMrgRxbuf);
  pending_ = 0;
  activation_ = activation;
  active_ = true;
  {
    std::lock_guard control_lock(control_mutex_);
    control_ = activation;
    guest_offloads_ = activation.acked_features & kGuestOffloadFeatures;
  }
  paused_ = false;
  if (kernel_) {
    if (start_kernel_locked()) return true;
    active_ = false;
    activation_ = {};
    std::lock_guard control_lock(control_mutex_);
    control_.reset();
    return false;
  }
  // Frames the tap queued before the driver came up are read as soon as there are buffers.
  watch_backend_locked();
  return true;
}

void VirtioNet::reset() {
  bool was_watching;
  {
    std::lock_guard lock(mutex_);
    {
      // A command running now finishes first; none runs after this.
      std::lock_guard control_lock(control_mutex_);
      control_.reset();
    }
    stop_kernel_locked();
    paused_ = false;
    active_ = false;
    was_watching = watching_;
    watching_ = false;
    activation_ = {};
    pending_ = 0;  // like a NIC's FIFO on reset: frames not yet delivered are lost
  }
  // Outside our lock: remove() waits for a running callback, which may be waiting for it.
  if (was_watching) loop_.remove(backend_->fd());
  backend_->set_offloads(0);
  offloads_ = 0;
}

bool VirtioNet::start_kernel_locked() {
  const memory::GuestMemory& memory = *activation_.memory;
  NetKernelStart start;
  start.features = activation_.acked_features & kernel_features_;
  start.memory = &memory;
  start.tap_fd = backend_->fd();
  for (uint16_t q : {kNetReceiveQueue, kNetTransmitQueue}) {
    if (!activation_.queues[q].ready()) {
      log_.warn("virtio-net: the driver did not enable the receive and transmit queues");
      return false;
    }
  }
  events_->connect(activation_, [this](uint16_t q) {
    (q == kNetReceiveQueue ? metrics_.rx_interrupts : metrics_.tx_interrupts)++;
  });
  for (uint16_t q : {kNetReceiveQueue, kNetTransmitQueue}) {
    auto ring = describe_kernel_ring(activation_.queues[q], q, memory, events_->kick_fd(q),
                                     events_->call_fd(q));
    if (!ring) {
      events_->disconnect(nullptr);
      return false;
    }
    start.rings.push_back(*ring);
    if (events_->direct_kick(q)) metrics_.kernel_direct_kicks++;
    if (events_->direct_call(q)) metrics_.kernel_direct_calls++;
  }
  kernel_running_ = true;
  try {
    kernel_->start(start);
  } catch (const std::exception& e) {
    log_.warn(std::string("virtio-net: cannot start the kernel data path: ") + e.what());
    stop_kernel_locked();
    return false;
  }
  metrics_.kernel_starts++;
  events_->kick_all();
  return true;
}

void VirtioNet::stop_kernel_locked() {
  if (!kernel_running_) return;
  kernel_running_ = false;
  std::vector<uint16_t> next_avail;
  try {
    next_avail = kernel_->stop();
  } catch (const std::exception& e) {
    log_.warn(std::string("virtio-net: stopping the kernel data path: ") + e.what());
  }
  // Interrupts the kernel raised just before it stopped are delivered, not lost.
  events_->disconnect(activation_.interrupt);
  // The queues learn where the kernel got to: the avail index from the kernel, the used index
  // from the ring it wrote.
  const memory::GuestMemory* memory = activation_.memory;
  for (size_t i = 0; memory && i < next_avail.size() && i < 2; ++i) {
    if (auto error = take_back_kernel_ring(activation_.queues[i], next_avail[i], *memory))
      log_.warn("virtio-net: taking the rings back: " + *error);
  }
}

void VirtioNet::pause() {
  bool was_watching = false;
  {
    std::lock_guard lock(mutex_);
    if (!active_ || paused_) return;
    paused_ = true;
    if (kernel_) {
      stop_kernel_locked();
      return;
    }
    // Userspace path: a receive pass pops a buffer before it reads the tap and gives it back
    // when nothing came, so the rings are only still while no pass can start.
    was_watching = std::exchange(watching_, false);
  }
  // Outside our lock: remove() waits for a running callback, which may be waiting for it.
  if (was_watching) loop_.remove(backend_->fd());
}

void VirtioNet::resume() {
  std::lock_guard lock(mutex_);
  if (!active_ || !paused_) return;
  paused_ = false;
  if (kernel_) {
    if (!start_kernel_locked())
      activation_.interrupt->needs_reset("virtio-net: the kernel data path did not restart");
    return;
  }
  // Kicks that came while paused were dropped. Send what the driver queued meanwhile; receive
  // passes stay on the loop thread (one may unwatch the tap, which off the loop would wait for
  // a callback blocked on our lock), where watching the tap again starts one if frames wait.
  transmit_locked();
  watch_backend_locked();
}

void VirtioNet::watch_backend_locked() {
  if (watching_) return;
  watching_ = true;
  loop_.add(backend_->fd(), [this](uint32_t) {
    std::lock_guard lock(mutex_);
    metrics_.rx_wakeups++;
    if (active_ && !paused_) receive_locked();
  });
}

void VirtioNet::unwatch_backend_locked() {
  if (!watching_) return;
  watching_ = false;
  loop_.remove(backend_->fd());  // on the loop thread: does not wait
}

void VirtioNet::process_queue(uint16_t queue) {
  if (queue == kNetControlQueue) {
    process_control();
    return;
  }
  if (kernel_) {
    // Relay the driver's notification; no lock, as pause() and reset() wait for the loop while
    // holding it. A kick while the kernel is stopped is kept by the eventfd.
    if (queue > kNetTransmitQueue) return;
    (queue == kNetReceiveQueue ? metrics_.rx_kicks : metrics_.tx_kicks)++;
    events_->relay_kick(queue);
    return;
  }
  std::lock_guard lock(mutex_);
  if (!active_ || paused_) return;  // resume() looks at the rings
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

void VirtioNet::process_control() {
  std::lock_guard lock(control_mutex_);
  if (!control_) return;
  Queue& queue = control_->queues[kNetControlQueue];
  if (!queue.ready()) return;
  const memory::GuestMemory& memory = *control_->memory;
  bool used = false;
  do {
    DescriptorChain chain;
    Queue::PopStatus status;
    while ((status = queue.pop(memory, chain)) == Queue::PopStatus::kChain) {
      if (!queue.add_used(memory, chain.head, run_control_command(chain))) {
        control_->interrupt->needs_reset("virtio-net: control used ring unwritable");
        return;
      }
      used = true;
    }
    if (status == Queue::PopStatus::kError) {
      control_->interrupt->needs_reset("virtio-net controlq: " + queue.error());
      return;
    }
  } while (queue.enable_notification());
  if (used && queue.needs_notification()) control_->interrupt->signal_queue(kNetControlQueue);
}

// Runs one command; returns the bytes written into the chain (the ack, or 0 without room).
uint32_t VirtioNet::run_control_command(const DescriptorChain& chain) {
  ChainBuffers command(chain, false), reply(chain, true);
  uint8_t header[2];  // class, command
  uint8_t ack = kNetCtrlErr;
  if (reply.size() == 0) {
    log_.warn("virtio-net: a control command without room for the device's ack");
    metrics_.control_errors++;
    return 0;
  }
  if (!command.read(0, header)) {
    log_.warn("virtio-net: a control command shorter than its class and command bytes");
  } else if (header[0] == kNetCtrlGuestOffloads && header[1] == kNetCtrlGuestOffloadsSet &&
             (control_->acked_features & kNetFeatureCtrlGuestOffloads)) {
    ack = set_guest_offloads(command);
  } else {
    log_.warn(fmt::format("virtio-net: unsupported control command class {} command {}", header[0],
                          header[1]));
  }
  (ack == kNetCtrlOk ? metrics_.control_commands : metrics_.control_errors)++;
  reply.write(*control_->memory, 0, std::span(&ack, 1));
  return 1;
}

// VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET: a le64 bitmap of the receive offloads to keep on, each
// of which must have been negotiated (spec 5.1.6.5.6).
uint8_t VirtioNet::set_guest_offloads(const ChainBuffers& command) {
  uint64_t offloads = 0;
  if (command.size() != 2 + sizeof(offloads)) {
    log_.warn(fmt::format("virtio-net: GUEST_OFFLOADS_SET with {} bytes of data, not 8",
                          command.size() - 2));
    return kNetCtrlErr;
  }
  command.read(2, std::span(reinterpret_cast<uint8_t*>(&offloads), sizeof(offloads)));
  if (auto error = switch_guest_offloads_locked(le64toh(offloads))) {
    log_.warn("virtio-net: GUEST_OFFLOADS_SET: " + *error);
    return kNetCtrlErr;
  }
  return kNetCtrlOk;
}

// With control_mutex_ held and the device active: the tap takes `offloads` (feature bits), if
// the driver negotiated them all. Returns why not otherwise, and changes nothing then.
std::optional<std::string> VirtioNet::switch_guest_offloads_locked(uint64_t offloads) {
  if (offloads & ~(control_->acked_features & kGuestOffloadFeatures))
    return fmt::format("offloads {:#x} were not negotiated", offloads);
  const uint32_t flags = tap_offloads(offloads);
  if (!backend_->set_offloads(flags)) return fmt::format("the tap refused offloads {:#x}", flags);
  offloads_ = flags;
  guest_offloads_ = offloads;
  return std::nullopt;
}

NetState VirtioNet::save() {
  std::lock_guard lock(control_mutex_);
  return {NetState::kVersion, control_ ? guest_offloads_ : 0};
}

void VirtioNet::restore(const NetState& state) {
  if (state.version != NetState::kVersion)
    throw std::invalid_argument(fmt::format("virtio-net: state version {} (this kiln reads {})",
                                            state.version, NetState::kVersion));
  std::lock_guard lock(control_mutex_);
  if (!control_) return;  // the driver had not set DRIVER_OK: nothing is on
  if (auto error = switch_guest_offloads_locked(state.guest_offloads))
    throw std::invalid_argument("virtio-net: cannot restore: " + *error);
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

// One receive pass with VIRTIO_NET_F_MRG_RXBUF (spec 5.1.6.4): chains are taken from the ring
// ahead of the frames and held, in ring order, until a frame fills the first of them.
struct VirtioNet::MergeState {
  struct Held {
    uint16_t head;
    ChainBuffers buffers;
    bool usable;  // room for the header and few enough pieces for one readv
    size_t descriptors;
  };
  explicit MergeState(Queue& q) : queue(q) {}

  Queue& queue;
  std::vector<Held> held;  // popped, not yet used; the front is the oldest
  size_t front = 0;        // held[front..] are still held
  uint64_t capacity = 0;   // bytes in the usable chains held
  size_t pieces = 0;       // their iovecs
  size_t descriptors = 0;  // in all chains held
  // The last attempt to take a chain stopped because the next one would not fit in one readv.
  bool pieces_full = false;
  bool used = false;

  size_t count() const { return held.size() - front; }
};

void VirtioNet::receive_locked() {
  Queue& queue = activation_.queues[kNetReceiveQueue];
  if (!queue.ready()) {
    unwatch_backend_locked();
    return;
  }
  bool used = false;
  if (merge_) {
    MergeState state(queue);
    bool ok = receive_merged_locked(state);
    // Buffers taken but not filled stay the guest's: the next pass takes them again, and the
    // queue's state (save(), the kernel data path) never counts them as consumed.
    if (ok && state.count() > 0) queue.undo_pop(uint16_t(state.count()));
    used = state.used;
  } else {
    for (int budget = kReceiveBudget; budget > 0; --budget) {
      if (!receive_one_locked(queue)) break;
      used = true;
    }
  }
  if (used && queue.needs_notification()) {
    metrics_.rx_interrupts++;
    activation_.interrupt->signal_queue(kNetReceiveQueue);
  }
}

// Both receive paths take their buffers here.
VirtioNet::RxPop VirtioNet::pop_receive_chain_locked(Queue& queue, DescriptorChain& chain) {
  for (int rearms = 0;;) {
    Queue::PopStatus status = queue.pop(*activation_.memory, chain);
    if (status == Queue::PopStatus::kChain) return RxPop::kChain;
    if (status == Queue::PopStatus::kError) {
      unwatch_backend_locked();
      activation_.interrupt->needs_reset("virtio-net receiveq: " + queue.error());
      return RxPop::kBroken;
    }
    // Re-arm the guest's kick and look once more: buffers posted in between must not wait.
    if (!queue.enable_notification()) return RxPop::kEmpty;
    if (++rearms >= kRearmLimit) return RxPop::kBusy;
  }
}

// Without VIRTIO_NET_F_MRG_RXBUF: one frame per chain. True if a chain was used.
bool VirtioNet::receive_one_locked(Queue& queue) {
  const memory::GuestMemory& memory = *activation_.memory;
  DescriptorChain chain;
  const RxPop popped = pop_receive_chain_locked(queue, chain);
  if (popped == RxPop::kEmpty) {
    // Nowhere to put frames: stop watching the tap until the guest posts buffers.
    metrics_.rx_pauses++;
    unwatch_backend_locked();
  }
  // kBusy: still watching the tap, the next wake-up looks again.
  if (popped != RxPop::kChain) return false;
  ChainBuffers buffers(chain, true);
  auto iov = buffers.iovecs(0, buffers.size());
  if (buffers.size() < kNetHeaderSize || iov.size() > IOV_MAX) {
    log_.warn(fmt::format("virtio-net: unusable receive buffer ({} bytes in {} pieces)",
                          buffers.size(), iov.size()));
    metrics_.rx_bad_buffers++;
    return queue.add_used(memory, chain.head, 0);
  }
  ssize_t got = ::readv(backend_->fd(), iov.data(), int(iov.size()));
  if (got < ssize_t(kNetHeaderSize)) {
    queue.undo_pop();  // the buffer stays the guest's for the next frame
    if (got < 0 && errno != EAGAIN && errno != EINTR) {
      log_.warn(fmt::format("virtio-net: tap read failed: {}", std::strerror(errno)));
      unwatch_backend_locked();
    }
    return false;
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
    return false;
  }
  return true;
}

bool VirtioNet::receive_merged_locked(MergeState& state) {
  for (int budget = kReceiveBudget; budget > 0; --budget) {
    if (pending_ == 0) {
      // Enough chains for the longest frame lets the tap write straight into guest memory;
      // short of that, the frame goes through bounce_ so that its length is known first.
      if (!hold_buffers_locked(state, kMaxReceive)) return false;
      bool direct = state.capacity >= kMaxReceive;
      if (bounce_.empty()) bounce_.resize(kMaxReceive + 1);  // +1: a longer frame shows
      std::vector<iovec> iov;
      if (direct) {
        for (size_t i = state.front; i < state.held.size(); ++i) {
          if (!state.held[i].usable) continue;
          auto more = state.held[i].buffers.iovecs(0, state.held[i].buffers.size());
          iov.insert(iov.end(), more.begin(), more.end());
        }
      } else {
        iov.push_back({bounce_.data(), bounce_.size()});
      }
      ssize_t got = ::readv(backend_->fd(), iov.data(), int(iov.size()));
      if (got < 0) {
        if (errno != EAGAIN && errno != EINTR) {
          log_.warn(fmt::format("virtio-net: tap read failed: {}", std::strerror(errno)));
          unwatch_backend_locked();
        }
        return true;
      }
      // A tap reports a frame's full length even when it had to cut it to fit.
      if (got < ssize_t(kNetHeaderSize) || uint64_t(got) > kMaxReceive) {
        metrics_.rx_dropped++;
        continue;
      }
      if (direct) {
        if (!deliver_merged_locked(state, uint64_t(got), nullptr)) return false;
        continue;
      }
      pending_ = uint64_t(got);
    }
    if (!hold_buffers_locked(state, pending_)) return false;
    if (state.capacity >= pending_) {
      uint64_t length = std::exchange(pending_, 0);
      if (!deliver_merged_locked(state, length, bounce_.data())) return false;
      continue;
    }
    // Too few buffers for this frame. Spec 5.1.6.4 lets the device wait for more, and the
    // driver refills as it consumes, so keep it (a dropped TCP segment costs a retransmission
    // timeout) and stop reading the tap until the guest kicks. Only when the guest cannot post
    // more, because every ring entry or the readv piece limit is taken, will it never fit.
    // (Descriptors count rather than chains: a driver chaining several per buffer fills its
    // table with fewer chains. Linux posts mergeable buffers as single descriptors.)
    bool ring_full = state.count() >= state.queue.size() ||
                     state.descriptors >= state.queue.size() || state.pieces_full;
    if (ring_full) {
      log_.warn(
          fmt::format("virtio-net: dropping a {}-byte frame: the guest's receive buffers "
                      "hold {} bytes",
                      pending_, state.capacity));
      metrics_.rx_dropped++;
      pending_ = 0;
      continue;
    }
    metrics_.rx_pauses++;
    unwatch_backend_locked();
    return true;
  }
  return true;
}

// Takes chains from the ring until the usable ones hold `want` bytes or there are no more.
// False if the queue broke (NEEDS_RESET raised).
bool VirtioNet::hold_buffers_locked(MergeState& state, uint64_t want) {
  Queue& queue = state.queue;
  state.pieces_full = false;
  while (state.capacity < want && state.count() < queue.size()) {
    DescriptorChain chain;
    const RxPop popped = pop_receive_chain_locked(queue, chain);
    if (popped == RxPop::kBroken) return false;
    if (popped != RxPop::kChain) return true;  // the caller decides whether to wait
    ChainBuffers buffers(chain, true);
    size_t pieces = buffers.segment_count();
    // Spec 5.1.6.3.1: with MRG_RXBUF every buffer holds at least a virtio_net_hdr.
    bool usable = buffers.size() >= kNetHeaderSize && pieces <= IOV_MAX;
    if (usable && state.pieces + pieces > IOV_MAX) {
      // Would not fit in the same readv as the usable chains held: leave it for a later one.
      // It is the chain popped last, so the held ones stay the most recent pops.
      queue.undo_pop();
      state.pieces_full = true;
      return true;
    }
    if (usable) {
      state.capacity += buffers.size();
      state.pieces += pieces;
    }
    state.descriptors += chain.descriptors.size();
    state.held.push_back({chain.head, std::move(buffers), usable, chain.descriptors.size()});
  }
  return true;
}

// Gives the frame of `length` bytes (already in the held chains, or at `copy_from`) to the
// guest: fills held chains in ring order, sets num_buffers, and publishes the used entries of
// the frame at once. Unusable chains it passes over go back empty, before the frame's.
bool VirtioNet::deliver_merged_locked(MergeState& state, uint64_t length,
                                      const uint8_t* copy_from) {
  const memory::GuestMemory& memory = *activation_.memory;
  std::vector<Queue::UsedElement> used;
  size_t frame_start = 0;
  const ChainBuffers* first = nullptr;
  uint64_t left = length;
  size_t i = state.front;
  for (; i < state.held.size() && left > 0; ++i) {
    MergeState::Held& held = state.held[i];
    state.descriptors -= held.descriptors;
    if (!held.usable) {
      log_.warn(fmt::format("virtio-net: unusable receive buffer ({} bytes in {} pieces)",
                            held.buffers.size(), held.buffers.segment_count()));
      metrics_.rx_bad_buffers++;
      used.insert(used.begin() + ptrdiff_t(frame_start), {held.head, 0});
      ++frame_start;
      continue;
    }
    uint64_t chunk = std::min(left, held.buffers.size());
    uint64_t offset = length - left;
    if (copy_from) {
      held.buffers.write(memory, 0, std::span(copy_from + offset, size_t(chunk)));
    } else {
      held.buffers.mark_dirty(memory, 0, chunk);
    }
    if (!first) first = &held.buffers;
    used.push_back({held.head, uint32_t(chunk)});
    state.capacity -= held.buffers.size();
    state.pieces -= held.buffers.segment_count();
    left -= chunk;
  }
  state.front = i;
  // The caller made sure the usable chains held are enough; `first` is set as length > 0.
  if (!first) return true;
  uint16_t num_buffers = uint16_t(used.size() - frame_start);
  const uint8_t count[2] = {uint8_t(num_buffers), uint8_t(num_buffers >> 8)};
  first->write(memory, kNetNumBuffersOffset, count);
  if (!state.queue.add_used(memory, used)) {
    unwatch_backend_locked();
    activation_.interrupt->needs_reset("virtio-net: receive used ring unwritable");
    return false;
  }
  state.used = true;
  metrics_.rx_packets++;
  metrics_.rx_bytes += length - kNetHeaderSize;
  return true;
}

}  // namespace kiln::devices::virtio
