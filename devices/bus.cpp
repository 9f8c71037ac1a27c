#include "devices/bus.h"

#include <algorithm>
#include <mutex>
#include <stdexcept>

namespace kiln::devices {

void Bus::insert(std::shared_ptr<BusDevice> device, uint64_t base, uint64_t len) {
  if (len == 0 || base + len < base) throw std::invalid_argument("bus range is empty or wraps");
  std::unique_lock lock(mutex_);
  auto next = ranges_.lower_bound(base);
  if (next != ranges_.end() && next->first < base + len)
    throw std::invalid_argument("bus range overlaps an existing device");
  if (next != ranges_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second.len > base)
      throw std::invalid_argument("bus range overlaps an existing device");
  }
  ranges_.emplace(base, Entry{len, std::move(device)});
}

bool Bus::remove(uint64_t base) {
  std::unique_lock lock(mutex_);
  return ranges_.erase(base) > 0;
}

void Bus::clear() {
  std::unique_lock lock(mutex_);
  ranges_.clear();
}

std::shared_ptr<BusDevice> Bus::lookup(uint64_t addr, uint64_t size, uint64_t& offset) const {
  std::shared_lock lock(mutex_);
  auto it = ranges_.upper_bound(addr);
  if (it == ranges_.begin()) return nullptr;
  --it;
  uint64_t off = addr - it->first;
  if (off >= it->second.len || size > it->second.len - off) return nullptr;
  offset = off;
  return it->second.device;
}

bool Bus::read(uint64_t addr, std::span<uint8_t> data) const {
  uint64_t offset = 0;
  auto device = lookup(addr, data.size(), offset);
  if (!device) {
    std::fill(data.begin(), data.end(), 0xff);
    return false;
  }
  device->read(offset, data);
  return true;
}

bool Bus::write(uint64_t addr, std::span<const uint8_t> data) const {
  uint64_t offset = 0;
  auto device = lookup(addr, data.size(), offset);
  if (!device) return false;
  device->write(offset, data);
  return true;
}

}  // namespace kiln::devices
