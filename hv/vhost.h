// The host kernel's vhost interface (/dev/vhost-*): a device's virtqueues processed in the kernel,
// straight from guest memory. Like KVM, this is host-kernel plumbing, so it lives here and devices
// only see the narrow back-end interfaces they define. Errors are std::system_error with the
// ioctl's errno (EADDRINUSE for a vsock CID another VM holds).
#pragma once

#include <cstdint>
#include <span>
#include <string>

#include "base/unique_fd.h"

namespace kiln::hv {

struct VhostMemoryRegion {
  uint64_t gpa = 0;
  uint64_t size = 0;
  uint64_t host = 0;  // userspace address of the mapping
};

// Host (userspace) addresses of one split virtqueue's parts.
struct VhostVringAddresses {
  uint64_t desc = 0;
  uint64_t avail = 0;
  uint64_t used = 0;
};

class VhostDevice {
 public:
  // Opens `path` and becomes its owner (VHOST_SET_OWNER). Throws std::system_error.
  explicit VhostDevice(const std::string& path);

  uint64_t features() const;  // VHOST_GET_FEATURES
  void set_features(uint64_t features);
  void set_memory_table(std::span<const VhostMemoryRegion> regions);
  void set_vring_num(uint32_t index, uint32_t size);
  void set_vring_base(uint32_t index, uint32_t next_avail);
  // Stops the ring and returns where the kernel got to in the avail ring.
  uint32_t get_vring_base(uint32_t index);
  void set_vring_addresses(uint32_t index, const VhostVringAddresses& addresses);
  // Eventfds: `kick` is what the kernel waits on for notifications, `call` what it signals.
  void set_vring_kick(uint32_t index, int fd);
  void set_vring_call(uint32_t index, int fd);

  int fd() const { return fd_.get(); }

 protected:
  void ioctl_or_throw(unsigned long request, const void* arg, const char* what) const;

 private:
  UniqueFd fd_;
};

// vhost-vsock (/dev/vhost-vsock): the rx and tx queues of a virtio-vsock device.
class VhostVsock : public VhostDevice {
 public:
  static constexpr const char* kDefaultPath = "/dev/vhost-vsock";
  explicit VhostVsock(const std::string& path = kDefaultPath) : VhostDevice(path) {}
  // EADDRINUSE: another VM on this host has `cid`.
  void set_guest_cid(uint64_t cid);
  void set_running(bool running);
};

// vhost-net (/dev/vhost-net): the rx and tx queues of a virtio-net device, moving frames
// between guest buffers and a tap fd inside the kernel. The tap keeps doing the virtio_net_hdr
// (IFF_VNET_HDR), so VHOST_NET_F_VIRTIO_NET_HDR is never acked.
class VhostNet : public VhostDevice {
 public:
  static constexpr const char* kDefaultPath = "/dev/vhost-net";
  explicit VhostNet(const std::string& path = kDefaultPath) : VhostDevice(path) {}
  // Attaches tap `fd` to ring `index`; -1 detaches it (the ring stops).
  void set_backend(uint32_t index, int fd);
};

}  // namespace kiln::hv
