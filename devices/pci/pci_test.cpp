#include <gtest/gtest.h>

#include <array>

#include "devices/bus.h"
#include "devices/pci/msix.h"
#include "devices/pci/pci_device.h"
#include "devices/pci/pci_root.h"
#include "devices/virtio/test_support.h"

namespace kiln::devices::pci {
namespace {

using virtio::testing::FakeMsiAllocator;

constexpr uint32_t kMsixTable = 0x0;
constexpr uint32_t kMsixPba = 0x800;

// A device with a 32-bit memory BAR, an I/O BAR, a 64-bit BAR holding an MSI-X table, and a
// vendor capability.
class TestDevice : public PciDevice {
 public:
  explicit TestDevice(MsiAllocator& msi)
      : PciDevice(PciIdentity{0x1234, 0x5678, 2, 0x028000, 0x1234, 0x0001}), msix(4, msi) {
    add_bar(0, {BarType::kMemory32, 0x1000, false});
    add_bar(1, {BarType::kIo, 0x20, false});
    add_bar(2, {BarType::kMemory64, 0x4000, true});
    vendor_cap = add_capability(0x09, std::array<uint8_t, 6>{8, 1, 2, 3, 4, 5});
    msix_cap = add_capability(kMsixCapabilityId, msix.capability_body(2, kMsixTable, 2, kMsixPba),
                              Msix::capability_writable_mask());
  }
  void bar_read(int bar, uint64_t offset, std::span<uint8_t> data) override {
    if (bar == 2 && offset < kMsixPba) return msix.table_read(offset - kMsixTable, data);
    if (bar == 2) return msix.pba_read(offset - kMsixPba, data);
    store_le(data, bar == 0 ? scratch : 0xAB);
  }
  void bar_write(int bar, uint64_t offset, std::span<const uint8_t> data) override {
    if (bar == 2 && offset < kMsixPba) return msix.table_write(offset - kMsixTable, data);
    if (bar == 0 && offset == 0) scratch = uint32_t(load_le(data));
  }
  void config_written(uint32_t offset, size_t size) override {
    if (offset <= msix_cap + 3 && offset + size > msix_cap + 2) {
      uint8_t control[2];
      read_config_bytes(msix_cap + 2, control);
      msix.set_control(uint16_t(control[0] | control[1] << 8));
    }
  }
  Msix msix;
  uint32_t vendor_cap = 0;
  uint32_t msix_cap = 0;
  uint32_t scratch = 0;
};

class PciTest : public ::testing::Test {
 protected:
  PciTest() : mapper_(mmio_, pio_), root_(mapper_), cf8_(root_), ecam_(root_) {
    device_ = std::make_shared<TestDevice>(msi_);
    slot_ = root_.add(device_);
    pio_.insert(std::shared_ptr<BusDevice>(&cf8_, [](BusDevice*) {}), kConfigIoBase, kConfigIoSize);
    mmio_.insert(std::shared_ptr<BusDevice>(&ecam_, [](BusDevice*) {}), kEcamBase, kEcamSize);
  }

  uint32_t cf8_read(uint8_t slot, uint32_t reg, size_t size = 4) {
    uint8_t address[4];
    store_le(address, 0x8000'0000u | uint32_t(slot) << 11 | (reg & 0xFC));
    pio_.write(kConfigIoBase, address);
    uint8_t data[4];
    pio_.read(kConfigIoBase + 4 + (reg & 3), std::span<uint8_t>(data, size));
    return uint32_t(load_le(std::span<const uint8_t>(data, size)));
  }
  void cf8_write(uint8_t slot, uint32_t reg, uint32_t value, size_t size = 4) {
    uint8_t address[4];
    store_le(address, 0x8000'0000u | uint32_t(slot) << 11 | (reg & 0xFC));
    pio_.write(kConfigIoBase, address);
    uint8_t data[4];
    store_le(std::span<uint8_t>(data, size), value);
    pio_.write(kConfigIoBase + 4 + (reg & 3), std::span<const uint8_t>(data, size));
  }
  uint64_t ecam_addr(uint8_t slot, uint32_t reg) {
    return kEcamBase + (uint64_t(slot) << 15) + reg;
  }
  uint32_t ecam_read(uint8_t slot, uint32_t reg, size_t size = 4) {
    uint8_t data[4];
    mmio_.read(ecam_addr(slot, reg), std::span<uint8_t>(data, size));
    return uint32_t(load_le(std::span<const uint8_t>(data, size)));
  }
  void ecam_write(uint8_t slot, uint32_t reg, uint32_t value, size_t size = 4) {
    uint8_t data[4];
    store_le(std::span<uint8_t>(data, size), value);
    mmio_.write(ecam_addr(slot, reg), std::span<const uint8_t>(data, size));
  }
  uint32_t mmio_read32(uint64_t gpa) {
    uint8_t data[4];
    mmio_.read(gpa, data);
    return uint32_t(load_le(data));
  }
  void mmio_write32(uint64_t gpa, uint32_t value) {
    uint8_t data[4];
    store_le(data, value);
    mmio_.write(gpa, data);
  }

  Bus mmio_, pio_;
  BusBarMapper mapper_;
  PciRoot root_;
  PciConfigIo cf8_;
  PciConfigMmio ecam_;
  FakeMsiAllocator msi_;
  std::shared_ptr<TestDevice> device_;
  uint8_t slot_ = 0;
};

TEST_F(PciTest, HostBridgeAndDeviceIdentity) {
  EXPECT_EQ(slot_, 1);
  EXPECT_EQ(cf8_read(0, 0x08) >> 8, 0x060000u);  // host bridge class
  EXPECT_EQ(cf8_read(slot_, 0x00), 0x5678'1234u);
  EXPECT_EQ(cf8_read(slot_, 0x08), 0x0280'0002u);
  EXPECT_EQ(cf8_read(slot_, 0x2C), 0x0001'1234u);
  EXPECT_EQ(cf8_read(7, 0x00), 0xFFFF'FFFFu);  // empty slot
}

TEST_F(PciTest, ConfigMechanismOneAndEcamAgree) {
  for (uint8_t slot : {uint8_t(0), slot_, uint8_t(9)}) {
    for (uint32_t reg = 0; reg < 0x100; reg += 4)
      EXPECT_EQ(cf8_read(slot, reg), ecam_read(slot, reg));
  }
  // Byte and word accesses on the data port see the same bytes as ECAM.
  EXPECT_EQ(cf8_read(slot_, 0x02, 2), 0x5678u);
  EXPECT_EQ(cf8_read(slot_, 0x03, 1), 0x56u);
  EXPECT_EQ(ecam_read(slot_, 0x03, 1), 0x56u);
  // A write through one mechanism is visible through the other.
  cf8_write(slot_, 0x3C, 0x0B, 1);
  EXPECT_EQ(ecam_read(slot_, 0x3C, 1), 0x0Bu);
  ecam_write(slot_, 0x0D, 0x40, 1);
  EXPECT_EQ(cf8_read(slot_, 0x0D, 1), 0x40u);
  // Without the enable bit, the data port reads ones.
  uint8_t address[4] = {0, 0, 0, 0};
  pio_.write(kConfigIoBase, address);
  uint8_t data[4];
  pio_.read(kConfigIoBase + 4, data);
  EXPECT_EQ(load_le(data), 0xFFFF'FFFFu);
}

TEST_F(PciTest, BarSizingByWritingAllOnes) {
  uint32_t bar0 = cf8_read(slot_, 0x10);
  EXPECT_EQ(bar0 & 0xF, 0u);
  EXPECT_GE(bar0, kMmio32WindowBase);
  cf8_write(slot_, 0x10, 0xFFFF'FFFF);
  EXPECT_EQ(cf8_read(slot_, 0x10), ~(0x1000u - 1));
  cf8_write(slot_, 0x14, 0xFFFF'FFFF);
  EXPECT_EQ(cf8_read(slot_, 0x14), (~(0x20u - 1)) | 0x1);
  // 64-bit prefetchable: type bits 10b and prefetch bit in the low dword, size across both.
  uint64_t bar2 = uint64_t(cf8_read(slot_, 0x1C)) << 32 | (cf8_read(slot_, 0x18) & ~0xFu);
  EXPECT_EQ(bar2, kMmio64WindowBase);
  cf8_write(slot_, 0x18, 0xFFFF'FFFF);
  cf8_write(slot_, 0x1C, 0xFFFF'FFFF);
  EXPECT_EQ(cf8_read(slot_, 0x18), (~(0x4000u - 1)) | 0xC);
  EXPECT_EQ(cf8_read(slot_, 0x1C), 0xFFFF'FFFFu);
  // Unimplemented BARs and the expansion ROM read zero whatever is written.
  cf8_write(slot_, 0x20, 0xFFFF'FFFF);
  EXPECT_EQ(cf8_read(slot_, 0x20), 0u);
  cf8_write(slot_, 0x30, 0xFFFF'FFFF);
  EXPECT_EQ(cf8_read(slot_, 0x30), 0u);
}

TEST_F(PciTest, CapabilityListWalk) {
  EXPECT_TRUE(cf8_read(slot_, 0x04) >> 16 & kStatusCapabilitiesList);
  std::vector<uint8_t> ids;
  uint32_t next = cf8_read(slot_, kCapabilitiesPointer, 1);
  for (int guard = 0; next && guard < 48; ++guard) {
    EXPECT_EQ(next % 4, 0u);
    ids.push_back(uint8_t(ecam_read(slot_, next, 1)));
    next = ecam_read(slot_, next + 1, 1);
  }
  EXPECT_EQ(ids, (std::vector<uint8_t>{0x09, kMsixCapabilityId}));
  EXPECT_EQ(ecam_read(slot_, device_->vendor_cap + 2, 1), 8u);
  // The capability body is read-only.
  ecam_write(slot_, device_->vendor_cap + 4, 0xFFFF'FFFF);
  EXPECT_EQ(ecam_read(slot_, device_->vendor_cap + 4, 2), 0x0302u);
  // MSI-X: table size N-1, table and PBA in BAR 2.
  EXPECT_EQ(ecam_read(slot_, device_->msix_cap + 2, 2), 3u);
  EXPECT_EQ(ecam_read(slot_, device_->msix_cap + 4), kMsixTable | 2);
  EXPECT_EQ(ecam_read(slot_, device_->msix_cap + 8), kMsixPba | 2);
}

TEST_F(PciTest, MemoryDecodingFollowsCommandRegisterAndBarMoves) {
  uint32_t base = cf8_read(slot_, 0x10);
  mmio_write32(base, 0x1111);
  EXPECT_EQ(device_->scratch, 0u);  // decoding off: nothing there
  cf8_write(slot_, 0x04, kCommandMemoryEnable, 2);
  EXPECT_EQ(device_->bar_mapping(0), base);
  mmio_write32(base, 0x2222);
  EXPECT_EQ(device_->scratch, 0x2222u);
  EXPECT_EQ(mmio_read32(base), 0x2222u);
  // Port I/O BAR stays off until I/O decoding is enabled.
  uint8_t byte[1];
  EXPECT_FALSE(pio_.read(cf8_read(slot_, 0x14) & ~0x3u, byte));

  // The guest moves BAR 0: the old range goes away, the new one decodes.
  uint32_t moved = 0xD000'0000;
  cf8_write(slot_, 0x10, moved);
  EXPECT_EQ(device_->bar_mapping(0), moved);
  EXPECT_EQ(mmio_read32(base), 0xFFFF'FFFFu);
  EXPECT_EQ(mmio_read32(moved), 0x2222u);

  cf8_write(slot_, 0x04, kCommandIoEnable, 2);  // memory off, I/O on
  EXPECT_EQ(device_->bar_mapping(0), std::nullopt);
  EXPECT_EQ(mmio_read32(moved), 0xFFFF'FFFFu);
  EXPECT_TRUE(pio_.read(cf8_read(slot_, 0x14) & ~0x3u, byte));
  EXPECT_EQ(byte[0], 0xAB);
}

TEST_F(PciTest, BarMovedOntoAnotherDeviceIsNotDecoded) {
  cf8_write(slot_, 0x10, uint32_t(kEcamBase));  // on top of ECAM
  cf8_write(slot_, 0x04, kCommandMemoryEnable, 2);
  EXPECT_EQ(ecam_read(slot_, 0x00), 0x5678'1234u);  // ECAM still works, no crash
}

class MsixTest : public PciTest {
 protected:
  void SetUp() override {
    cf8_write(slot_, 0x04, kCommandMemoryEnable, 2);
    table_ = device_->bar_address(2);
  }
  void enable(bool function_mask = false) {
    uint16_t control = kMsixControlEnable | (function_mask ? kMsixControlFunctionMask : 0);
    ecam_write(slot_, device_->msix_cap + 2, control, 2);
  }
  void program(uint16_t vector, uint64_t address, uint32_t data, bool masked) {
    uint64_t entry = table_ + vector * kMsixEntrySize;
    mmio_write32(entry, uint32_t(address));
    mmio_write32(entry + 4, uint32_t(address >> 32));
    mmio_write32(entry + 8, data);
    mmio_write32(entry + 12, masked ? 1 : 0);
  }
  uint64_t pba() { return uint64_t(mmio_read32(table_ + kMsixPba)); }
  uint64_t table_ = 0;
};

TEST_F(MsixTest, EntriesStartMaskedAndConfigureVectors) {
  EXPECT_EQ(mmio_read32(table_ + 12), 1u);
  enable();
  program(1, 0xFEE0'1000, 0x4041, false);
  auto* vector = msi_.vectors[1];
  EXPECT_EQ(vector->address, 0xFEE0'1000u);
  EXPECT_EQ(vector->data, 0x4041u);
  EXPECT_FALSE(vector->masked);
  EXPECT_EQ(mmio_read32(table_ + 16 + 8), 0x4041u);
  EXPECT_TRUE(device_->msix.trigger(1));
  EXPECT_EQ(vector->triggers, 1);
}

TEST_F(MsixTest, MaskedVectorSetsPendingAndFiresOnUnmask) {
  enable();
  program(2, 0xFEE0'0000, 0x30, true);
  EXPECT_TRUE(device_->msix.trigger(2));
  EXPECT_EQ(msi_.vectors[2]->triggers, 0);
  EXPECT_TRUE(device_->msix.pending(2));
  EXPECT_EQ(pba(), 1u << 2);
  mmio_write32(table_ + 2 * kMsixEntrySize + 12, 0);  // unmask
  EXPECT_EQ(msi_.vectors[2]->triggers, 1);
  EXPECT_FALSE(device_->msix.pending(2));
  EXPECT_EQ(pba(), 0u);
}

// A kernel back-end (vhost) signals the vector's irqfd directly, masked or not: the vector holds
// the signal while masked, the PBA shows it, and unmasking delivers it once.
TEST_F(MsixTest, KernelSignalsToAMaskedVectorShowInThePbaAndFireOnUnmask) {
  enable();
  msi_.vectors[1]->direct_fd = 42;
  program(1, 0xFEE0'0000, 0x41, true);
  EXPECT_EQ(device_->msix.direct_eventfd(1), 42);  // handed out even while masked
  msi_.vectors[1]->held_signals = 3;
  EXPECT_EQ(pba(), 1u << 1);
  EXPECT_EQ(msi_.vectors[1]->held_signals, 0);
  EXPECT_EQ(msi_.vectors[1]->triggers, 0);
  mmio_write32(table_ + kMsixEntrySize + 12, 0);  // unmask
  EXPECT_FALSE(msi_.vectors[1]->masked);
  EXPECT_EQ(msi_.vectors[1]->triggers, 1);
  EXPECT_EQ(pba(), 0u);
}

TEST_F(MsixTest, HeldKernelSignalsAreSavedAsPending) {
  enable();
  program(0, 0xFEE0'0000, 0x40, true);
  msi_.vectors[0]->held_signals = 1;
  MsixState state = device_->msix.save();
  EXPECT_EQ(state.pending.at(0), 1u);
  EXPECT_TRUE(device_->msix.pending(0));
}

TEST_F(MsixTest, DirectEventfdNeedsMsixEnabled) {
  msi_.vectors[0]->direct_fd = 7;
  EXPECT_EQ(device_->msix.direct_eventfd(0), -1);
  enable(/*function_mask=*/true);
  EXPECT_EQ(device_->msix.direct_eventfd(0), 7);
  EXPECT_EQ(device_->msix.direct_eventfd(4), -1);  // no such vector
}

TEST_F(MsixTest, FunctionMaskHoldsEveryVector) {
  enable(/*function_mask=*/true);
  program(0, 0xFEE0'0000, 0x31, false);
  EXPECT_TRUE(msi_.vectors[0]->masked);
  device_->msix.trigger(0);
  EXPECT_EQ(msi_.vectors[0]->triggers, 0);
  EXPECT_TRUE(device_->msix.pending(0));
  enable(false);
  EXPECT_FALSE(msi_.vectors[0]->masked);
  EXPECT_EQ(msi_.vectors[0]->triggers, 1);
}

TEST_F(MsixTest, DisabledMsixDropsMessagesAndOutOfRangeVectors) {
  program(0, 0xFEE0'0000, 0x31, false);
  EXPECT_FALSE(device_->msix.trigger(0));
  enable();
  EXPECT_FALSE(device_->msix.trigger(4));
  EXPECT_EQ(msi_.vectors[0]->triggers, 0);
}

TEST_F(MsixTest, SaveRestoreKeepsTableAndPending) {
  enable();
  program(3, 0xFEE0'2000, 0x55, true);
  device_->msix.trigger(3);
  MsixState state = device_->msix.save();
  FakeMsiAllocator other_msi;
  Msix copy(4, other_msi);
  copy.restore(state);
  EXPECT_TRUE(copy.pending(3));
  EXPECT_EQ(other_msi.vectors[3]->data, 0x55u);
  EXPECT_TRUE(other_msi.vectors[3]->masked);
}

TEST_F(PciTest, ConfigStateRestoresGuestWrites) {
  cf8_write(slot_, 0x10, 0xD100'0000);
  cf8_write(slot_, 0x04, kCommandMemoryEnable, 2);
  PciConfigState state = device_->save_config();
  FakeMsiAllocator other_msi;
  TestDevice copy(other_msi);
  auto changes = copy.restore_config(state);
  EXPECT_EQ(copy.bar_mapping(0), 0xD100'0000u);
  ASSERT_FALSE(changes.empty());
}

}  // namespace
}  // namespace kiln::devices::pci
