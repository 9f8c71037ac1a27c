#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <sys/ioctl.h>

#include <cerrno>
#include <cstring>

#include "devices/virtio/net_backend.h"
#include "devices/virtio/virtio_net.h"

namespace kiln::devices::virtio {

static_assert(kTunOffloadCsum == TUN_F_CSUM && kTunOffloadTso4 == TUN_F_TSO4 &&
              kTunOffloadTso6 == TUN_F_TSO6 && kTunOffloadTsoEcn == TUN_F_TSO_ECN);

std::unique_ptr<Tap> Tap::open(const std::string& name, const std::string& device) {
  if (name.empty() || name.size() >= IFNAMSIZ)
    throw TapError("tap name '" + name + "' must be 1 to " + std::to_string(IFNAMSIZ - 1) +
                   " characters");
  UniqueFd fd(::open(device.c_str(), O_RDWR | O_NONBLOCK | O_CLOEXEC));
  if (!fd) {
    int err = errno;
    throw TapError("cannot open " + device + ": " + std::strerror(err) +
                   (err == EACCES || err == EPERM ? " (need root or CAP_NET_ADMIN)" : ""));
  }
  unsigned int features = 0;
  if (ioctl(fd.get(), TUNGETFEATURES, &features) == 0 && !(features & IFF_VNET_HDR))
    throw TapError("this kernel's tap driver lacks IFF_VNET_HDR");
  ifreq request{};
  std::strncpy(request.ifr_name, name.c_str(), IFNAMSIZ - 1);
  request.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
  if (ioctl(fd.get(), TUNSETIFF, &request) < 0) {
    int err = errno;
    std::string why = std::strerror(err);
    if (err == EBUSY) why = "it is busy (another process has it open)";
    if (err == EPERM || err == EACCES)
      why = "permission denied (create it with 'ip tuntap add " + name +
            " mode tap user USER' or run with CAP_NET_ADMIN)";
    if (err == EINVAL) why = "it exists but is not a tap with these flags (" + why + ")";
    throw TapError("cannot attach to tap " + name + ": " + why);
  }
  int header_size = int(kNetHeaderSize);
  if (ioctl(fd.get(), TUNSETVNETHDRSZ, &header_size) < 0)
    throw TapError("tap " + name +
                   ": cannot set the virtio-net header size: " + std::strerror(errno));
  auto tap = std::unique_ptr<Tap>(new Tap(std::move(fd), request.ifr_name));
  // No offloads until a driver accepts them (see VirtioNet::activate).
  tap->set_offloads(0);
  return tap;
}

bool Tap::set_offloads(uint32_t flags) {
  return ioctl(fd_.get(), TUNSETOFFLOAD, static_cast<unsigned long>(flags)) == 0;
}

}  // namespace kiln::devices::virtio
