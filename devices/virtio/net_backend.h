// What virtio-net needs from the host side of a network interface: a nonblocking fd that moves
// one frame per readv/writev, each prefixed with the 12-byte virtio_net_hdr (a Linux tap with
// IFF_VNET_HDR; a SOCK_DGRAM socketpair in tests), and a way to say which offloads the guest
// accepts on receive.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <system_error>
#include <vector>

#include "base/unique_fd.h"
#include "devices/virtio/kernel_ring.h"

namespace kiln::devices::virtio {

// Offload flags of TUNSETOFFLOAD (linux/if_tun.h), spelled out so devices need no kernel header.
inline constexpr uint32_t kTunOffloadCsum = 0x01;
inline constexpr uint32_t kTunOffloadTso4 = 0x02;
inline constexpr uint32_t kTunOffloadTso6 = 0x04;
inline constexpr uint32_t kTunOffloadTsoEcn = 0x08;

class NetBackend {
 public:
  virtual ~NetBackend() = default;
  virtual int fd() const = 0;
  // Which offloads frames delivered to the guest may use (kTunOffload* bits). False if the
  // host refused them.
  virtual bool set_offloads(uint32_t flags) = 0;
};

// What the kernel data path is given when the driver sets DRIVER_OK.
struct NetKernelStart {
  uint64_t features = 0;  // negotiated with the driver, masked to NetKernelDatapath::features()
  const memory::GuestMemory* memory = nullptr;
  std::vector<KernelRing> rings;  // receive, then transmit
  int tap_fd = -1;
};

// A data path that moves frames between the guest's rings and the tap inside the host kernel
// (vhost-net), implemented by the VMM. Called from the thread that activates or resets the
// device; throws std::exception on failure.
class NetKernelDatapath {
 public:
  virtual ~NetKernelDatapath() = default;
  // Ring and device features it can do (VIRTIO_F_*, VIRTIO_RING_F_*, VIRTIO_NET_F_MRG_RXBUF).
  virtual uint64_t features() const = 0;
  virtual void start(const NetKernelStart& start) = 0;
  // Detaches the tap and stops the rings; returns each ring's next available index, in the
  // order start() was given them, so the device can carry on from there.
  virtual std::vector<uint16_t> stop() = 0;
};

// Why a tap could not be opened, in words for the user (permission, busy, no such device).
class TapError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A Linux tap interface (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, 12-byte header, nonblocking).
class Tap : public NetBackend {
 public:
  // Attaches to (or creates, with CAP_NET_ADMIN) tap `name`. Throws TapError.
  static std::unique_ptr<Tap> open(const std::string& name,
                                   const std::string& device = "/dev/net/tun");

  int fd() const override { return fd_.get(); }
  bool set_offloads(uint32_t flags) override;
  const std::string& name() const { return name_; }

 private:
  Tap(UniqueFd fd, std::string name) : fd_(std::move(fd)), name_(std::move(name)) {}
  UniqueFd fd_;
  std::string name_;
};

}  // namespace kiln::devices::virtio
