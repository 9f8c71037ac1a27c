#include "devices/pci/msix.h"

#include <stdexcept>

namespace kiln::devices::pci {
namespace {

uint32_t read32(const std::vector<uint8_t>& bytes, size_t offset) {
  uint32_t value = 0;
  for (int i = 0; i < 4; ++i) value |= uint32_t(bytes[offset + i]) << (8 * i);
  return value;
}

void append32(std::vector<uint8_t>& out, uint32_t value) {
  for (int i = 0; i < 4; ++i) out.push_back(uint8_t(value >> (8 * i)));
}

}  // namespace

Msix::Msix(uint16_t num_vectors, MsiAllocator& allocator) {
  if (num_vectors == 0 || num_vectors > 2048)
    throw std::invalid_argument("MSI-X supports 1 to 2048 vectors");
  table_.assign(size_t(num_vectors) * kMsixEntrySize, 0);
  pending_.assign((num_vectors + 63) / 64, 0);
  for (uint16_t v = 0; v < num_vectors; ++v) {
    table_[v * kMsixEntrySize + 12] = kMsixVectorControlMask;
    vectors_.push_back(allocator.allocate());
    if (!vectors_.back()) throw std::runtime_error("MSI allocator returned no vector");
  }
}

std::vector<uint8_t> Msix::capability_body(int table_bar, uint32_t table_offset, int pba_bar,
                                           uint32_t pba_offset) const {
  if ((table_offset | pba_offset) & 7) throw std::invalid_argument("MSI-X structures misaligned");
  std::vector<uint8_t> body;
  uint16_t control = uint16_t(num_vectors() - 1);  // table size is encoded as N-1
  body.push_back(uint8_t(control));
  body.push_back(uint8_t(control >> 8));
  append32(body, table_offset | uint32_t(table_bar));
  append32(body, pba_offset | uint32_t(pba_bar));
  return body;
}

std::vector<uint8_t> Msix::capability_writable_mask() {
  return {0x00, uint8_t((kMsixControlEnable | kMsixControlFunctionMask) >> 8), 0, 0, 0, 0, 0, 0, 0,
          0};
}

void Msix::set_control(uint16_t control) {
  std::lock_guard lock(mutex_);
  bool enabled = control & kMsixControlEnable;
  bool masked = control & kMsixControlFunctionMask;
  if (enabled == enabled_ && masked == function_masked_) return;
  enabled_ = enabled;
  function_masked_ = masked;
  sync_all_locked();
}

bool Msix::enabled() const {
  std::lock_guard lock(mutex_);
  return enabled_;
}

uint64_t Msix::entry_address(uint16_t vector) const {
  size_t base = size_t(vector) * kMsixEntrySize;
  return uint64_t(read32(table_, base)) | uint64_t(read32(table_, base + 4)) << 32;
}

uint32_t Msix::entry_data(uint16_t vector) const {
  return read32(table_, size_t(vector) * kMsixEntrySize + 8);
}

bool Msix::entry_masked(uint16_t vector) const {
  return read32(table_, size_t(vector) * kMsixEntrySize + 12) & kMsixVectorControlMask;
}

bool Msix::delivery_blocked_locked(uint16_t vector) const {
  return !enabled_ || function_masked_ || entry_masked(vector);
}

void Msix::sync_entry_locked(uint16_t vector) {
  bool blocked = delivery_blocked_locked(vector);
  vectors_[vector]->configure(entry_address(vector), entry_data(vector), blocked);
  uint64_t bit = 1ull << (vector % 64);
  if (!blocked && (pending_[vector / 64] & bit)) {
    pending_[vector / 64] &= ~bit;
    vectors_[vector]->trigger();
  }
}

void Msix::collect_held_locked(uint16_t vector) const {
  if (delivery_blocked_locked(vector) && vectors_[vector]->take_pending())
    pending_[vector / 64] |= 1ull << (vector % 64);
}

void Msix::sync_all_locked() {
  for (uint16_t v = 0; v < num_vectors(); ++v) sync_entry_locked(v);
}

void Msix::table_read(uint64_t offset, std::span<uint8_t> data) const {
  std::lock_guard lock(mutex_);
  for (size_t i = 0; i < data.size(); ++i)
    data[i] = offset + i < table_.size() ? table_[offset + i] : 0xFF;
}

void Msix::table_write(uint64_t offset, std::span<const uint8_t> data) {
  std::lock_guard lock(mutex_);
  if (offset >= table_.size() || data.size() > table_.size() - offset) return;
  uint64_t first = offset / kMsixEntrySize;
  uint64_t last = (offset + data.size() - 1) / kMsixEntrySize;
  bool changed = false;
  for (size_t i = 0; i < data.size(); ++i) {
    uint64_t at = offset + i;
    uint8_t value = data[i];
    // Only the mask bit of Vector Control is defined; the rest is reserved and reads zero.
    if (at % kMsixEntrySize == 12) value &= kMsixVectorControlMask;
    if (at % kMsixEntrySize > 12) value = 0;
    changed |= table_[at] != value;
    table_[at] = value;
  }
  if (!changed) return;
  for (uint64_t v = first; v <= last; ++v) sync_entry_locked(uint16_t(v));
}

void Msix::pba_read(uint64_t offset, std::span<uint8_t> data) const {
  std::lock_guard lock(mutex_);
  for (uint64_t v = offset * 8; v < (offset + data.size()) * 8 && v < num_vectors(); ++v)
    collect_held_locked(uint16_t(v));
  for (size_t i = 0; i < data.size(); ++i) {
    uint64_t byte = offset + i;
    data[i] = byte / 8 < pending_.size() ? uint8_t(pending_[byte / 8] >> (8 * (byte % 8))) : 0;
  }
}

bool Msix::trigger(uint16_t vector) {
  std::lock_guard lock(mutex_);
  if (!enabled_ || vector >= num_vectors()) return false;
  if (function_masked_ || entry_masked(vector)) {
    pending_[vector / 64] |= 1ull << (vector % 64);
    return true;
  }
  vectors_[vector]->trigger();
  return true;
}

int Msix::direct_eventfd(uint16_t vector) const {
  std::lock_guard lock(mutex_);
  if (!enabled_ || vector >= num_vectors()) return -1;
  return vectors_[vector]->eventfd();
}

bool Msix::pending(uint16_t vector) const {
  std::lock_guard lock(mutex_);
  if (vector >= num_vectors()) return false;
  collect_held_locked(vector);
  return (pending_[vector / 64] >> (vector % 64)) & 1;
}

MsixState Msix::save() const {
  std::lock_guard lock(mutex_);
  for (uint16_t v = 0; v < num_vectors(); ++v) collect_held_locked(v);
  MsixState state;
  state.enabled = enabled_;
  state.function_masked = function_masked_;
  state.table = table_;
  state.pending = pending_;
  return state;
}

void Msix::restore(const MsixState& state) {
  std::lock_guard lock(mutex_);
  if (state.version != MsixState::kVersion || state.table.size() != table_.size() ||
      state.pending.size() != pending_.size())
    throw std::invalid_argument("MSI-X state does not match this device");
  enabled_ = state.enabled;
  function_masked_ = state.function_masked;
  table_ = state.table;
  pending_ = state.pending;
  sync_all_locked();
}

}  // namespace kiln::devices::pci
