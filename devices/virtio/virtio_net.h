// virtio-net (virtio 1.2 section 5.1) with one receive and one transmit queue over a NetBackend
// (a Linux tap). Frames move between guest buffers and the tap with one readv/writev each,
// virtio_net_hdr included: the tap (IFF_VNET_HDR) understands the same header, so checksum
// and segmentation offloads pass through untouched. With VIRTIO_NET_F_MRG_RXBUF a received
// frame may span several receive chains (see receive_merged_locked).
//
// With a NetKernelDatapath (vhost-net), the receive and transmit rings run in the host kernel
// instead: the device negotiates features, sets the tap's offloads and hands the rings and the
// tap over on DRIVER_OK, relays notifications through eventfds, and takes them back on reset.
//
// With VIRTIO_NET_F_CTRL_VQ a third queue carries the driver's control commands; the device
// does VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET (VIRTIO_NET_F_CTRL_GUEST_OFFLOADS), which lets a
// guest turn receive offloads off at run time, as it must before it attaches an XDP program.
// Commands run in this process whichever data path moves the frames.
//
// Receive is driven by the tap: the event loop watches its fd while the guest has receive
// buffers posted, and stops watching it when they run out (or a readable tap with nowhere to
// put the frame would spin the loop) until the guest kicks the receive queue again.
#pragma once

#include <array>
#include <atomic>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "base/event_loop.h"
#include "devices/virtio/net_backend.h"
#include "devices/virtio/rate_limited_log.h"
#include "devices/virtio/virtio_device.h"

namespace kiln::devices::virtio {

class ChainBuffers;

inline constexpr uint32_t kDeviceIdNet = 1;
inline constexpr uint16_t kNetReceiveQueue = 0;
inline constexpr uint16_t kNetTransmitQueue = 1;
inline constexpr uint16_t kNetControlQueue = 2;

// Feature bits (spec 5.1.3).
inline constexpr uint64_t kNetFeatureCsum = 1ull << 0;
inline constexpr uint64_t kNetFeatureGuestCsum = 1ull << 1;
inline constexpr uint64_t kNetFeatureCtrlGuestOffloads = 1ull << 2;
inline constexpr uint64_t kNetFeatureMac = 1ull << 5;
inline constexpr uint64_t kNetFeatureGuestTso4 = 1ull << 7;
inline constexpr uint64_t kNetFeatureGuestTso6 = 1ull << 8;
inline constexpr uint64_t kNetFeatureGuestEcn = 1ull << 9;
inline constexpr uint64_t kNetFeatureHostTso4 = 1ull << 11;
inline constexpr uint64_t kNetFeatureHostTso6 = 1ull << 12;
inline constexpr uint64_t kNetFeatureHostEcn = 1ull << 13;
inline constexpr uint64_t kNetFeatureMrgRxbuf = 1ull << 15;
inline constexpr uint64_t kNetFeatureStatus = 1ull << 16;
inline constexpr uint64_t kNetFeatureCtrlVq = 1ull << 17;

// Control queue commands (spec 5.1.6.5): class, command, data, then the device's ack byte.
inline constexpr uint8_t kNetCtrlGuestOffloads = 5;
inline constexpr uint8_t kNetCtrlGuestOffloadsSet = 0;
inline constexpr uint8_t kNetCtrlOk = 0;
inline constexpr uint8_t kNetCtrlErr = 1;

inline constexpr uint16_t kNetStatusLinkUp = 1;
// struct virtio_net_hdr with num_buffers, always present with VIRTIO_F_VERSION_1.
inline constexpr uint32_t kNetHeaderSize = 12;
inline constexpr uint32_t kNetNumBuffersOffset = 10;
// mac[6], status, max_virtqueue_pairs.
inline constexpr uint32_t kNetConfigSize = 10;
// The largest frame a guest may hand us: a 64 KiB GSO packet plus Ethernet/VLAN headers.
inline constexpr uint32_t kNetMaxFrame = 65550;

using MacAddress = std::array<uint8_t, 6>;

// 52:54:00 plus three bytes of a hash of `tap`, so a VM keeps its MAC across restarts.
MacAddress default_mac(const std::string& tap);
std::string format_mac(const MacAddress& mac);
// "52:54:00:12:34:56" (either case); nullopt if malformed.
std::optional<MacAddress> parse_mac(const std::string& text);

struct NetMetrics {
  std::atomic<uint64_t> tx_packets{0};
  std::atomic<uint64_t> tx_bytes{0};
  std::atomic<uint64_t> tx_dropped{0};
  std::atomic<uint64_t> rx_packets{0};
  std::atomic<uint64_t> rx_bytes{0};
  std::atomic<uint64_t> rx_bad_buffers{0};
  std::atomic<uint64_t> rx_pauses{0};  // times the guest ran out of receive buffers
  // Frames from the tap that fit nowhere: larger than every buffer the guest can post at once
  // (with VIRTIO_NET_F_MRG_RXBUF) or than any frame the device accepts.
  std::atomic<uint64_t> rx_dropped{0};
  std::atomic<uint64_t> tx_kicks{0};  // driver notifications, per queue
  std::atomic<uint64_t> rx_kicks{0};
  std::atomic<uint64_t> tx_interrupts{0};  // used-buffer interrupts sent, per queue
  std::atomic<uint64_t> rx_interrupts{0};
  std::atomic<uint64_t> rx_wakeups{0};     // the tap became readable
  std::atomic<uint64_t> kernel_starts{0};  // activations on the kernel data path
  // Rings started with the transport's notification eventfd / the vector's irqfd given to the
  // kernel directly (no trip through kiln), out of 2 per start.
  std::atomic<uint64_t> kernel_direct_kicks{0};
  std::atomic<uint64_t> kernel_direct_calls{0};
  std::atomic<uint64_t> control_commands{0};  // control queue commands acknowledged OK
  std::atomic<uint64_t> control_errors{0};    // refused, unknown or malformed
};

// What virtio-net keeps beyond the transport's state: the receive offloads the driver left on
// (feature bits; VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET may have changed them since negotiation).
struct NetState {
  static constexpr uint32_t kVersion = 1;
  uint32_t version = kVersion;
  uint64_t guest_offloads = 0;
};

class VirtioNet : public VirtioDevice {
 public:
  // `loop` must outlive the device; it watches the backend's fd while the device is active.
  // With `kernel`, the rings run in the kernel data path (it must be able to do
  // VIRTIO_F_VERSION_1); without, in this process.
  VirtioNet(std::unique_ptr<NetBackend> backend, const MacAddress& mac, EventLoop& loop,
            std::unique_ptr<NetKernelDatapath> kernel = nullptr);
  ~VirtioNet() override;

  uint32_t device_type() const override { return kDeviceIdNet; }
  uint32_t pci_class_code() const override { return 0x020000; }  // Ethernet controller
  uint64_t device_features() const override;
  uint16_t num_queues() const override { return 3; }  // receive, transmit, control
  uint32_t config_size() const override { return kNetConfigSize; }
  void read_config(uint64_t offset, std::span<uint8_t> data) override;

  bool activate(const VirtioActivation& activation) override;
  void process_queue(uint16_t queue) override;
  bool handles_notifications(uint16_t queue) const override {
    return kernel_ && queue <= kNetTransmitQueue;
  }
  void reset() override;

  const NetMetrics& metrics() const { return metrics_; }
  const MacAddress& mac() const { return mac_; }
  // Offload flags last given to the backend (kTunOffload*).
  uint32_t backend_offloads() const { return offloads_.load(); }
  bool uses_kernel_datapath() const { return kernel_ != nullptr; }

  // Stops all ring processing so that the transport's save() describes the rings exactly:
  // the kernel data path writes where it got to back into the queues, the userspace one stops
  // watching the tap. resume() starts again. For a paused VM (vCPUs stopped).
  void pause();
  void resume();

  NetState save();
  // After the transport's restore(), which activates the device: gives the tap the offloads
  // the driver had. Throws std::invalid_argument for a state of another version, offloads the
  // driver did not negotiate, or offloads the tap refuses.
  void restore(const NetState& state);

 private:
  struct MergeState;
  void process_control();
  uint32_t run_control_command(const DescriptorChain& chain);
  uint8_t set_guest_offloads(const ChainBuffers& command);
  std::optional<std::string> switch_guest_offloads_locked(uint64_t offloads);
  void transmit_locked();
  void receive_locked();
  // kEmpty: no buffer, and the guest's kick is armed for its next ones. kBusy: the ring kept
  // changing while re-arming (kRearmLimit tries). kBroken: NEEDS_RESET raised.
  enum class RxPop { kChain, kEmpty, kBusy, kBroken };
  RxPop pop_receive_chain_locked(Queue& queue, DescriptorChain& chain);
  bool receive_one_locked(Queue& queue);
  bool receive_merged_locked(MergeState& state);
  bool hold_buffers_locked(MergeState& state, uint64_t want);
  bool deliver_merged_locked(MergeState& state, uint64_t length, const uint8_t* copy_from);
  void watch_backend_locked();
  void unwatch_backend_locked();
  bool start_kernel_locked();
  void stop_kernel_locked();

  std::unique_ptr<NetBackend> backend_;
  MacAddress mac_;
  EventLoop& loop_;
  std::mutex mutex_;
  bool active_ = false;
  bool watching_ = false;  // the loop watches backend_->fd()
  VirtioActivation activation_;
  std::atomic<uint32_t> offloads_{0};
  std::unique_ptr<NetKernelDatapath> kernel_;
  uint64_t kernel_features_ = 0;
  std::unique_ptr<KernelRingEvents> events_;  // with kernel_: the rings' eventfds
  bool kernel_running_ = false;
  bool paused_ = false;
  bool merge_ = false;  // VIRTIO_NET_F_MRG_RXBUF negotiated (userspace data path)
  // With merge_: a frame read from the tap that waits for the guest to post enough buffers
  // (pending_ bytes, virtio_net_hdr first), and the bounce buffer it was read into.
  std::vector<uint8_t> bounce_;
  uint64_t pending_ = 0;
  // The control queue has its own lock: its commands run on the event loop also while the
  // kernel runs the rings, when no loop callback may take mutex_ (pause() and reset() hold it
  // while they wait for the loop). Lock order: mutex_, then control_mutex_. Holds a copy of
  // the activation while the device is active.
  std::mutex control_mutex_;
  std::optional<VirtioActivation> control_;
  uint64_t guest_offloads_ = 0;  // with control_: the receive offloads on, as feature bits
  NetMetrics metrics_;
  RateLimitedLog log_;
};

}  // namespace kiln::devices::virtio
