// MSI-X: the capability in config space plus the vector table and pending-bit array that live
// in a memory BAR. Each table entry is backed by an MsiVector from the VMM's MsiAllocator; the
// vector is reconfigured whenever the guest changes what it would deliver.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

#include "devices/irq.h"

namespace kiln::devices::pci {

inline constexpr uint8_t kMsixCapabilityId = 0x11;
inline constexpr uint32_t kMsixEntrySize = 16;
inline constexpr uint16_t kMsixControlEnable = 1 << 15;
inline constexpr uint16_t kMsixControlFunctionMask = 1 << 14;
inline constexpr uint32_t kMsixVectorControlMask = 1;

struct MsixState {
  static constexpr uint32_t kVersion = 1;
  uint32_t version = kVersion;
  bool enabled = false;
  bool function_masked = false;
  std::vector<uint8_t> table;  // entries * 16 bytes, guest layout
  std::vector<uint64_t> pending;
};

class Msix {
 public:
  // Allocates `num_vectors` (1..2048) vectors. Every entry starts masked, as the spec requires.
  Msix(uint16_t num_vectors, MsiAllocator& allocator);

  uint16_t num_vectors() const { return uint16_t(vectors_.size()); }
  uint32_t table_size_bytes() const { return num_vectors() * kMsixEntrySize; }
  uint32_t pba_size_bytes() const { return ((num_vectors() + 63) / 64) * 8; }

  // Body of the capability (after ID/next) for a table and PBA at the given BAR offsets, and
  // the mask of its guest-writable bits (enable and function mask).
  std::vector<uint8_t> capability_body(int table_bar, uint32_t table_offset, int pba_bar,
                                       uint32_t pba_offset) const;
  static std::vector<uint8_t> capability_writable_mask();
  // The guest wrote the Message Control word.
  void set_control(uint16_t control);
  bool enabled() const;

  // Table and PBA accesses, offsets relative to each structure's start.
  void table_read(uint64_t offset, std::span<uint8_t> data) const;
  void table_write(uint64_t offset, std::span<const uint8_t> data);
  void pba_read(uint64_t offset, std::span<uint8_t> data) const;

  // Sends `vector`, or records it as pending while masked. Returns false when MSI-X is off or
  // `vector` is out of range (the message is dropped: there is no INTx fallback here).
  bool trigger(uint16_t vector);
  bool pending(uint16_t vector) const;
  // The eventfd that raises `vector` in the kernel (MsiVector::eventfd) while MSI-X is on, else
  // -1. Masking holds its signals back like the model's own (MsiVector::configure), so a kernel
  // back-end may keep signalling it whatever the guest does with the mask bits.
  int direct_eventfd(uint16_t vector) const;

  MsixState save() const;
  void restore(const MsixState& state);

 private:
  uint64_t entry_address(uint16_t vector) const;
  uint32_t entry_data(uint16_t vector) const;
  bool entry_masked(uint16_t vector) const;
  bool delivery_blocked_locked(uint16_t vector) const;
  // Moves signals a kernel back-end sent to a masked vector into the pending bits.
  void collect_held_locked(uint16_t vector) const;
  // Pushes the entry to its MsiVector and fires a pending message the guest just unmasked.
  void sync_entry_locked(uint16_t vector);
  void sync_all_locked();

  mutable std::mutex mutex_;
  bool enabled_ = false;
  bool function_masked_ = false;
  std::vector<uint8_t> table_;
  // Mutable: readers (the PBA, save()) first collect the signals masked vectors hold.
  mutable std::vector<uint64_t> pending_;
  std::vector<std::unique_ptr<MsiVector>> vectors_;
};

}  // namespace kiln::devices::pci
