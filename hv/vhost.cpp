#include "hv/vhost.h"

#include <fcntl.h>
// linux/virtio_ring.h (via vhost_types.h) has legacy C helpers that are not valid C++.
#define VIRTIO_RING_NO_LEGACY
#include <linux/vhost.h>
#include <sys/ioctl.h>

#include <cerrno>
#include <memory>
#include <system_error>
#include <vector>

namespace kiln::hv {

VhostDevice::VhostDevice(const std::string& path) {
  fd_.reset(::open(path.c_str(), O_RDWR | O_CLOEXEC));
  if (!fd_) throw std::system_error(errno, std::generic_category(), path);
  ioctl_or_throw(VHOST_SET_OWNER, nullptr, "VHOST_SET_OWNER");
}

void VhostDevice::ioctl_or_throw(unsigned long request, const void* arg, const char* what) const {
  if (::ioctl(fd_.get(), request, arg) < 0)
    throw std::system_error(errno, std::generic_category(), what);
}

uint64_t VhostDevice::features() const {
  uint64_t features = 0;
  ioctl_or_throw(VHOST_GET_FEATURES, &features, "VHOST_GET_FEATURES");
  return features;
}

void VhostDevice::set_features(uint64_t features) {
  ioctl_or_throw(VHOST_SET_FEATURES, &features, "VHOST_SET_FEATURES");
}

void VhostDevice::set_memory_table(std::span<const VhostMemoryRegion> regions) {
  // struct vhost_memory ends in a flexible array of regions.
  size_t bytes = sizeof(vhost_memory) + regions.size() * sizeof(vhost_memory_region);
  std::vector<uint64_t> storage((bytes + 7) / 8, 0);
  auto* table = reinterpret_cast<vhost_memory*>(storage.data());
  table->nregions = uint32_t(regions.size());
  for (size_t i = 0; i < regions.size(); ++i) {
    table->regions[i].guest_phys_addr = regions[i].gpa;
    table->regions[i].memory_size = regions[i].size;
    table->regions[i].userspace_addr = regions[i].host;
  }
  ioctl_or_throw(VHOST_SET_MEM_TABLE, table, "VHOST_SET_MEM_TABLE");
}

void VhostDevice::set_vring_num(uint32_t index, uint32_t size) {
  vhost_vring_state state{index, size};
  ioctl_or_throw(VHOST_SET_VRING_NUM, &state, "VHOST_SET_VRING_NUM");
}

void VhostDevice::set_vring_base(uint32_t index, uint32_t next_avail) {
  vhost_vring_state state{index, next_avail};
  ioctl_or_throw(VHOST_SET_VRING_BASE, &state, "VHOST_SET_VRING_BASE");
}

uint32_t VhostDevice::get_vring_base(uint32_t index) {
  vhost_vring_state state{index, 0};
  ioctl_or_throw(VHOST_GET_VRING_BASE, &state, "VHOST_GET_VRING_BASE");
  return state.num;
}

void VhostDevice::set_vring_addresses(uint32_t index, const VhostVringAddresses& addresses) {
  vhost_vring_addr addr{};
  addr.index = index;
  addr.desc_user_addr = addresses.desc;
  addr.avail_user_addr = addresses.avail;
  addr.used_user_addr = addresses.used;
  ioctl_or_throw(VHOST_SET_VRING_ADDR, &addr, "VHOST_SET_VRING_ADDR");
}

void VhostDevice::set_vring_kick(uint32_t index, int fd) {
  vhost_vring_file file{index, fd};
  ioctl_or_throw(VHOST_SET_VRING_KICK, &file, "VHOST_SET_VRING_KICK");
}

void VhostDevice::set_vring_call(uint32_t index, int fd) {
  vhost_vring_file file{index, fd};
  ioctl_or_throw(VHOST_SET_VRING_CALL, &file, "VHOST_SET_VRING_CALL");
}

void VhostVsock::set_guest_cid(uint64_t cid) {
  ioctl_or_throw(VHOST_VSOCK_SET_GUEST_CID, &cid, "VHOST_VSOCK_SET_GUEST_CID");
}

void VhostVsock::set_running(bool running) {
  int value = running ? 1 : 0;
  ioctl_or_throw(VHOST_VSOCK_SET_RUNNING, &value, "VHOST_VSOCK_SET_RUNNING");
}

void VhostNet::set_backend(uint32_t index, int fd) {
  vhost_vring_file file{index, fd};
  ioctl_or_throw(VHOST_NET_SET_BACKEND, &file, "VHOST_NET_SET_BACKEND");
}

}  // namespace kiln::hv
