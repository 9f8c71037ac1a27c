// What virtio-net needs from the host side of a network interface: a nonblocking fd that moves
// one frame per readv/writev, each prefixed with the 12-byte virtio_net_hdr (a Linux tap with
// IFF_VNET_HDR; a SOCK_DGRAM socketpair in tests), and a way to say which offloads the guest
// accepts on receive.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <system_error>

#include "base/unique_fd.h"

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
