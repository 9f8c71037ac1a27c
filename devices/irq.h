// How devices raise interrupts without knowing KVM. The VMM implements these with
// KVM_IRQ_LINE, GSI routing and irqfds; tests implement them with counters.
#pragma once

#include <cstdint>
#include <memory>

namespace kiln::devices {

// A level-triggered interrupt line (ISA IRQ through the PIC/IOAPIC, PCI INTx).
class IrqLine {
 public:
  virtual ~IrqLine() = default;
  virtual void set_level(bool asserted) = 0;
};

// An edge-triggered interrupt that can be raised from any thread (an irqfd under KVM).
class InterruptTrigger {
 public:
  virtual ~InterruptTrigger() = default;
  virtual void trigger() = 0;
};

// One MSI / MSI-X vector: the guest programs address and data, the device triggers it.
class MsiVector : public InterruptTrigger {
 public:
  // Called when the guest writes the vector's table entry or (un)masks it. While `masked` no
  // message may reach the guest, not even one a kernel back-end signals on eventfd(): such
  // signals are held until the vector is unmasked (then delivered once) or take_pending().
  virtual void configure(uint64_t address, uint32_t data, bool masked) = 0;
  // An eventfd whose every write raises this vector inside the host kernel (a KVM irqfd), for
  // back-ends that run in the kernel too; -1 if there is none.
  virtual int eventfd() const { return -1; }
  // While masked: consumes the signals held from eventfd(); true if there were any (the MSI-X
  // model then shows the vector as pending).
  virtual bool take_pending() { return false; }
};

// Hands out MSI vectors (the VMM backs each by a GSI route and an irqfd).
class MsiAllocator {
 public:
  virtual ~MsiAllocator() = default;
  virtual std::unique_ptr<MsiVector> allocate() = 0;
};

}  // namespace kiln::devices
