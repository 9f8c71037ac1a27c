#include "devices/virtio/virtio_blk.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include "devices/virtio/memory_disk.h"
#include "devices/virtio/test_driver.h"

namespace kiln::devices::virtio {
namespace {

using namespace testing;

constexpr uint64_t kDiskSize = 1 << 20;
constexpr uint16_t kQueueSize = 16;
constexpr uint64_t kHeader = 0x20000;
constexpr uint64_t kData = 0x30000;
constexpr uint64_t kStatus = 0x40000;
constexpr uint64_t kIndirectTable = 0x48000;

uint64_t linux_features(uint64_t offered) {
  // What Linux's virtio_blk accepts of what we offer.
  return offered & (kFeatureVersion1 | kFeatureRingIndirectDesc | kFeatureRingEventIdx |
                    kBlkFeatureSizeMax | kBlkFeatureSegMax | kBlkFeatureBlkSize | kBlkFeatureFlush |
                    kBlkFeatureRo | kBlkFeatureMq | kBlkFeatureDiscard | kBlkFeatureWriteZeroes);
}

struct Result {
  uint8_t status;
  uint32_t used_len;
};

class VirtioBlkTest : public ::testing::Test {
 protected:
  void start(BlockConfig config = {}, bool read_only = false, bool async = true) {
    disk_ = std::make_shared<MemoryDisk>(kDiskSize, read_only, async);
    for (size_t i = 0; i < disk_->data.size(); ++i) disk_->data[i] = uint8_t(i * 7 + 3);
    blk_ = std::make_shared<VirtioBlock>(disk_, config);
    transport_ = std::make_shared<VirtioPciDevice>(blk_, m_.memory, m_.msi, m_.loop, &m_.notify);
    slot_ = m_.root.add(transport_);
    driver_ = std::make_unique<VirtioPciTestDriver>(m_, slot_);
    driver_->probe();
    for (uint16_t q = 0; q < config.num_queues; ++q) {
      uint64_t base = 0x100000 + q * 0x10000;
      queues_.push_back(
          std::make_unique<DriverQueue>(m_.memory, kQueueSize, base, base + 0x1000, base + 0x2000));
    }
  }

  void bring_up(uint64_t features = 0) {
    if (!features) features = linux_features(driver_->device_features());
    ASSERT_TRUE(driver_->negotiate(features));
    for (uint16_t q = 0; q < queues_.size(); ++q) driver_->setup_queue(q, *queues_[q]);
    driver_->driver_ok();
    ASSERT_EQ(driver_->status() & kStatusDriverOk, kStatusDriverOk);
  }

  void write_header(uint32_t type, uint64_t sector) {
    m_.memory.write_obj<uint32_t>(kHeader, type);
    m_.memory.write_obj<uint32_t>(kHeader + 4, 0);
    m_.memory.write_obj<uint64_t>(kHeader + 8, sector);
    m_.memory.write_obj<uint8_t>(kStatus, 0xEE);
  }

  // Submits header / data / status as Linux does and waits for the used element.
  Result request(uint32_t type, uint64_t sector, uint32_t data_len, bool data_writable,
                 uint16_t queue = 0, bool indirect = false) {
    write_header(type, sector);
    std::vector<DriverQueue::Buffer> chain = {{kHeader, 16, false}};
    if (data_len) chain.push_back({kData, data_len, data_writable});
    chain.push_back({kStatus, 1, true});
    return submit(chain, queue, indirect);
  }

  Result submit(const std::vector<DriverQueue::Buffer>& chain, uint16_t queue = 0,
                bool indirect = false) {
    DriverQueue& q = *queues_[queue];
    uint16_t used_before = q.used_idx();
    uint16_t slot = next_slot_;
    next_slot_ = uint16_t((next_slot_ + chain.size()) % kQueueSize);
    if (indirect) {
      q.add_indirect_chain(chain, slot, kIndirectTable);
    } else {
      q.add_chain(chain, slot);
    }
    driver_->notify(queue);
    EXPECT_TRUE(VirtioPciTestDriver::wait_used(q, uint16_t(used_before + 1)));
    auto [id, len] = q.used_element(used_before);
    EXPECT_EQ(id, slot);
    return {*m_.memory.read_obj<uint8_t>(kStatus), len};
  }

  std::vector<uint8_t> guest_bytes(uint64_t gpa, size_t len) {
    std::vector<uint8_t> out(len);
    m_.memory.read(gpa, out);
    return out;
  }

  TestMachine m_;
  std::shared_ptr<MemoryDisk> disk_;
  std::shared_ptr<VirtioBlock> blk_;
  std::shared_ptr<VirtioPciDevice> transport_;
  std::unique_ptr<VirtioPciTestDriver> driver_;
  std::vector<std::unique_ptr<DriverQueue>> queues_;
  uint8_t slot_ = 0;
  uint16_t next_slot_ = 0;
};

TEST_F(VirtioBlkTest, PciIdentityAndConfigSpace) {
  start(BlockConfig{.serial = "disk0", .num_queues = 2});
  EXPECT_EQ(driver_->config_read(0x00), 0x1042'1AF4u);  // modern virtio-blk
  EXPECT_EQ(driver_->config_read(0x08, 1), 1u);         // revision 1
  EXPECT_EQ(driver_->device_config(kBlkConfigCapacity, 8), kDiskSize / 512);
  EXPECT_EQ(driver_->device_config(kBlkConfigSegMax, 4), 254u);
  EXPECT_EQ(driver_->device_config(kBlkConfigBlkSize, 4), 512u);
  EXPECT_EQ(driver_->device_config(kBlkConfigNumQueues, 2), 2u);
  EXPECT_EQ(driver_->notify_multiplier(), 4u);
  uint64_t features = driver_->device_features();
  for (uint64_t bit : {kFeatureVersion1, kFeatureRingIndirectDesc, kFeatureRingEventIdx,
                       kBlkFeatureFlush, kBlkFeatureDiscard, kBlkFeatureWriteZeroes, kBlkFeatureMq,
                       kBlkFeatureSegMax, kBlkFeatureSizeMax, kBlkFeatureBlkSize})
    EXPECT_TRUE(features & bit) << std::hex << bit;
  EXPECT_FALSE(features & kBlkFeatureRo);
}

TEST_F(VirtioBlkTest, PciCfgCapabilityReachesTheBar) {
  start();
  uint32_t cap = 0;
  for (uint32_t at = driver_->config_read(pci::kCapabilitiesPointer, 1); at;
       at = driver_->config_read(at + 1, 1)) {
    if (driver_->config_read(at, 1) == kCapVendorSpecific &&
        driver_->config_read(at + 3, 1) == kCapPciCfg)
      cap = at;
  }
  ASSERT_NE(cap, 0u);
  // Read num_queues (common cfg 0x12, 2 bytes) through the window.
  driver_->config_write(cap + kPciCfgBar, kVirtioBar, 1);
  driver_->config_write(cap + kPciCfgOffset, kCommonCfgOffset + kCommonNumQueues);
  driver_->config_write(cap + kPciCfgLength, 2);
  EXPECT_EQ(driver_->config_read(cap + kPciCfgData, 2), 1u);
  // Write device_status = ACKNOWLEDGE through it and see it over MMIO.
  driver_->config_write(cap + kPciCfgOffset, kCommonCfgOffset + kCommonDeviceStatus);
  driver_->config_write(cap + kPciCfgLength, 1);
  driver_->config_write(cap + kPciCfgData, kStatusAcknowledge, 1);
  EXPECT_EQ(driver_->status(), kStatusAcknowledge);
  // A misaligned or oversized window reads zero and writes nothing.
  driver_->config_write(cap + kPciCfgLength, 8);
  EXPECT_EQ(driver_->config_read(cap + kPciCfgData), 0u);
}

TEST_F(VirtioBlkTest, RefusesFeaturesNotOfferedOrWithoutVersion1) {
  start();
  uint64_t offered = driver_->device_features();
  EXPECT_FALSE(driver_->negotiate(offered | (1ull << 40)));
  EXPECT_FALSE(driver_->negotiate(offered & ~kFeatureVersion1));
  // DRIVER_OK without FEATURES_OK does not start the device.
  driver_->driver_ok();
  EXPECT_FALSE(driver_->status() & kStatusDriverOk);
  EXPECT_TRUE(driver_->negotiate(kFeatureVersion1));
  EXPECT_EQ(transport_->acked_features(), kFeatureVersion1);
}

TEST_F(VirtioBlkTest, FeaturesAreFrozenAfterFeaturesOk) {
  start();
  ASSERT_TRUE(driver_->negotiate(kFeatureVersion1));
  driver_->write_driver_features(kFeatureVersion1 | kBlkFeatureFlush);
  EXPECT_EQ(transport_->acked_features(), kFeatureVersion1);
}

TEST_F(VirtioBlkTest, WriteThenReadThroughTheTransport) {
  start(BlockConfig{.serial = "s"});
  bring_up();
  std::vector<uint8_t> payload(1024);
  for (size_t i = 0; i < payload.size(); ++i) payload[i] = uint8_t(255 - i % 251);
  m_.memory.write(kData, payload);
  Result w = request(kBlkTypeOut, 8, 1024, false);
  EXPECT_EQ(w.status, kBlkStatusOk);
  EXPECT_EQ(w.used_len, 1u);
  EXPECT_TRUE(std::equal(payload.begin(), payload.end(), disk_->data.begin() + 8 * 512));

  std::vector<uint8_t> zeros(1024, 0);
  m_.memory.write(kData, zeros);
  Result r = request(kBlkTypeIn, 8, 1024, true);
  EXPECT_EQ(r.status, kBlkStatusOk);
  EXPECT_EQ(r.used_len, 1025u);
  EXPECT_EQ(guest_bytes(kData, 1024), payload);
  EXPECT_EQ(blk_->metrics().reads, 1u);
  EXPECT_EQ(blk_->metrics().write_bytes, 1024u);
  // Each completion interrupted the driver on queue 0's vector (1).
  EXPECT_TRUE(driver_->vector(1).wait_triggers(1));
}

TEST_F(VirtioBlkTest, IndirectRequestAndSplitHeader) {
  start();
  bring_up();
  // Header split over two descriptors inside an indirect table.
  write_header(kBlkTypeIn, 1);
  Result r = submit(
      {{kHeader, 10, false}, {kHeader + 10, 6, false}, {kData, 512, true}, {kStatus, 1, true}}, 0,
      /*indirect=*/true);
  EXPECT_EQ(r.status, kBlkStatusOk);
  EXPECT_TRUE(std::equal(disk_->data.begin() + 512, disk_->data.begin() + 1024,
                         guest_bytes(kData, 512).begin()));
}

TEST_F(VirtioBlkTest, FlushDiscardAndWriteZeroes) {
  start();
  bring_up();
  EXPECT_EQ(request(kBlkTypeFlush, 0, 0, false).status, kBlkStatusOk);
  EXPECT_EQ(disk_->flushes, 1);

  auto segment = [this](uint64_t sector, uint32_t sectors, uint32_t flags) {
    m_.memory.write_obj<uint64_t>(kData, sector);
    m_.memory.write_obj<uint32_t>(kData + 8, sectors);
    m_.memory.write_obj<uint32_t>(kData + 12, flags);
  };
  segment(4, 2, 0);
  EXPECT_EQ(request(kBlkTypeDiscard, 0, 16, false).status, kBlkStatusOk);
  EXPECT_EQ(disk_->discards, 1);
  EXPECT_TRUE(std::all_of(disk_->data.begin() + 4 * 512, disk_->data.begin() + 6 * 512,
                          [](uint8_t b) { return b == 0; }));
  EXPECT_NE(disk_->data[6 * 512], 0);

  segment(10, 1, kBlkWriteZeroesUnmap);
  EXPECT_EQ(request(kBlkTypeWriteZeroes, 0, 16, false).status, kBlkStatusOk);
  EXPECT_TRUE(std::all_of(disk_->data.begin() + 10 * 512, disk_->data.begin() + 11 * 512,
                          [](uint8_t b) { return b == 0; }));
  // The unmap flag is meaningless for discard, unknown flags are unsupported.
  segment(4, 1, kBlkWriteZeroesUnmap);
  EXPECT_EQ(request(kBlkTypeDiscard, 0, 16, false).status, kBlkStatusUnsupported);
  segment(4, 1, 0x80);
  EXPECT_EQ(request(kBlkTypeWriteZeroes, 0, 16, false).status, kBlkStatusUnsupported);
  // Out of range.
  segment(kDiskSize / 512, 1, 0);
  EXPECT_EQ(request(kBlkTypeDiscard, 0, 16, false).status, kBlkStatusIoErr);
  // Two segments where one is allowed.
  EXPECT_EQ(request(kBlkTypeDiscard, 0, 32, false).status, kBlkStatusIoErr);
}

TEST_F(VirtioBlkTest, AccountsRequestsAsQmpBlockstatsReports) {
  start();
  bring_up();
  ASSERT_EQ(request(kBlkTypeOut, 8, 1024, false).status, kBlkStatusOk);  // bytes 4096..5120
  ASSERT_EQ(request(kBlkTypeOut, 2, 512, false).status, kBlkStatusOk);
  ASSERT_EQ(request(kBlkTypeIn, 0, 2048, true).status, kBlkStatusOk);
  ASSERT_EQ(request(kBlkTypeFlush, 0, 0, false).status, kBlkStatusOk);
  disk_->fail_flush = true;
  ASSERT_EQ(request(kBlkTypeFlush, 0, 0, false).status, kBlkStatusIoErr);
  // Out of range and misaligned requests never reach the disk: invalid, not failed.
  ASSERT_EQ(request(kBlkTypeIn, kDiskSize / 512, 512, true).status, kBlkStatusIoErr);
  ASSERT_EQ(request(kBlkTypeOut, 0, 100, false).status, kBlkStatusIoErr);
  m_.memory.write_obj<uint64_t>(kData, 16);  // discard sectors 16..19
  m_.memory.write_obj<uint32_t>(kData + 8, 4);
  m_.memory.write_obj<uint32_t>(kData + 12, 0);
  ASSERT_EQ(request(kBlkTypeDiscard, 0, 16, false).status, kBlkStatusOk);
  m_.memory.write_obj<uint64_t>(kData, 100);  // write zeroes over sectors 100..101
  m_.memory.write_obj<uint32_t>(kData + 8, 2);
  ASSERT_EQ(request(kBlkTypeWriteZeroes, 0, 16, false).status, kBlkStatusOk);

  const BlockMetrics& m = blk_->metrics();
  EXPECT_EQ(m.read_acct.operations, 1u);
  EXPECT_EQ(m.read_acct.bytes, 2048u);
  EXPECT_EQ(m.read_acct.invalid, 1u);
  EXPECT_EQ(m.read_acct.failed, 0u);
  // Write-zeroes counts as a write, as in QEMU.
  EXPECT_EQ(m.write_acct.operations, 3u);
  EXPECT_EQ(m.write_acct.bytes, 1024u + 512u + 1024u);
  EXPECT_EQ(m.write_acct.invalid, 1u);
  EXPECT_EQ(m.wr_highest_offset, 102u * 512u);
  EXPECT_EQ(m.flush_acct.operations, 1u);
  EXPECT_EQ(m.flush_acct.failed, 1u);
  EXPECT_EQ(m.unmap_acct.operations, 1u);
  EXPECT_EQ(m.unmap_acct.bytes, 4u * 512u);
  EXPECT_GT(m.read_acct.total_time_ns, 0u);
  EXPECT_GT(m.write_acct.total_time_ns, 0u);
}

TEST_F(VirtioBlkTest, WritesToAReadOnlyDiskCountAsFailed) {
  start({}, /*read_only=*/true);
  bring_up();
  ASSERT_EQ(request(kBlkTypeOut, 0, 512, false).status, kBlkStatusIoErr);
  EXPECT_EQ(blk_->metrics().write_acct.failed, 1u);
  EXPECT_EQ(blk_->metrics().write_acct.operations, 0u);
  EXPECT_EQ(blk_->metrics().wr_highest_offset, 0u);
}

TEST_F(VirtioBlkTest, DiscardUnsupportedWhenNotNegotiated) {
  start();
  bring_up(kFeatureVersion1);
  m_.memory.write_obj<uint64_t>(kData, 0);
  m_.memory.write_obj<uint32_t>(kData + 8, 1);
  m_.memory.write_obj<uint32_t>(kData + 12, 0);
  EXPECT_EQ(request(kBlkTypeDiscard, 0, 16, false).status, kBlkStatusUnsupported);
  EXPECT_EQ(disk_->discards, 0);
}

TEST_F(VirtioBlkTest, GetIdReturnsSerial) {
  start(BlockConfig{.serial = "kiln-serial-0123456789abc"});  // longer than 20: truncated
  bring_up();
  Result r = request(kBlkTypeGetId, 0, 20, true);
  EXPECT_EQ(r.status, kBlkStatusOk);
  EXPECT_EQ(r.used_len, 21u);
  auto id = guest_bytes(kData, 20);
  EXPECT_EQ(std::string(id.begin(), id.end()), "kiln-serial-01234567");
}

TEST_F(VirtioBlkTest, GetIdPadsShortSerialWithZeros) {
  start(BlockConfig{.serial = "abc"});
  bring_up();
  std::vector<uint8_t> junk(20, 0x55);
  m_.memory.write(kData, junk);
  EXPECT_EQ(request(kBlkTypeGetId, 0, 20, true).status, kBlkStatusOk);
  auto id = guest_bytes(kData, 20);
  EXPECT_EQ(id[0], 'a');
  EXPECT_EQ(id[3], 0);
  EXPECT_EQ(id[19], 0);
}

TEST_F(VirtioBlkTest, ReadOnlyDiskRefusesWrites) {
  start({}, /*read_only=*/true);
  EXPECT_TRUE(driver_->device_features() & kBlkFeatureRo);
  bring_up();
  auto before = disk_->data;
  EXPECT_EQ(request(kBlkTypeOut, 0, 512, false).status, kBlkStatusIoErr);
  m_.memory.write_obj<uint64_t>(kData, 0);
  m_.memory.write_obj<uint32_t>(kData + 8, 1);
  m_.memory.write_obj<uint32_t>(kData + 12, 0);
  EXPECT_EQ(request(kBlkTypeWriteZeroes, 0, 16, false).status, kBlkStatusIoErr);
  EXPECT_EQ(disk_->data, before);
  EXPECT_EQ(request(kBlkTypeIn, 0, 512, true).status, kBlkStatusOk);
}

TEST_F(VirtioBlkTest, MalformedRequestsFailWithoutHarm) {
  start();
  bring_up();
  auto before = disk_->data;
  // Past the end of the disk.
  EXPECT_EQ(request(kBlkTypeIn, kDiskSize / 512, 512, true).status, kBlkStatusIoErr);
  EXPECT_EQ(request(kBlkTypeOut, ~0ull / 512, 512, false).status, kBlkStatusIoErr);
  // Length not a multiple of the sector size.
  EXPECT_EQ(request(kBlkTypeIn, 0, 100, true).status, kBlkStatusIoErr);
  // Unknown request type.
  EXPECT_EQ(request(77, 0, 0, false).status, kBlkStatusUnsupported);
  // Header shorter than 16 bytes.
  write_header(kBlkTypeIn, 0);
  EXPECT_EQ(submit({{kHeader, 8, false}, {kStatus, 1, true}}).status, kBlkStatusIoErr);
  // No writable status byte at all: the chain comes back with nothing written.
  write_header(kBlkTypeOut, 0);
  Result no_status = submit({{kHeader, 16, false}, {kData, 512, false}});
  EXPECT_EQ(no_status.used_len, 0u);
  EXPECT_EQ(disk_->data, before);
  EXPECT_GE(blk_->metrics().malformed, 2u);
  EXPECT_FALSE(driver_->status() & kStatusNeedsReset);
}

TEST_F(VirtioBlkTest, BrokenChainSetsNeedsResetAndInterruptsConfigVector) {
  start();
  bring_up();
  int config_triggers = driver_->vector(0).triggers;
  // A readable descriptor after a writable one is forbidden (spec 2.7.4.2).
  write_header(kBlkTypeIn, 0);
  queues_[0]->add_chain({{kStatus, 1, true}, {kHeader, 16, false}}, 0);
  driver_->notify(0);
  for (int i = 0; i < 500 && !(driver_->status() & kStatusNeedsReset); ++i) usleep(1000);
  EXPECT_TRUE(driver_->status() & kStatusNeedsReset);
  EXPECT_EQ(driver_->vector(0).triggers, config_triggers + 1);
  EXPECT_EQ(transport_->metrics().needs_reset, 1u);
  // ISR reports a configuration change, and reading it clears it.
  EXPECT_TRUE(driver_->read(driver_->isr(), 1) & 2);
  EXPECT_EQ(driver_->read(driver_->isr(), 1), 0u);

  // The driver recovers with a reset and the device works again.
  queues_[0] = std::make_unique<DriverQueue>(m_.memory, kQueueSize, 0x100000, 0x101000, 0x102000);
  next_slot_ = 0;
  bring_up();
  EXPECT_FALSE(driver_->status() & kStatusNeedsReset);
  EXPECT_EQ(request(kBlkTypeIn, 0, 512, true).status, kBlkStatusOk);
}

TEST_F(VirtioBlkTest, InvalidQueueSizeAtDriverOkNeedsReset) {
  start();
  ASSERT_TRUE(driver_->negotiate(linux_features(driver_->device_features())));
  DriverQueue odd(m_.memory, 12, 0x100000, 0x101000, 0x102000);  // not a power of two
  driver_->setup_queue(0, odd);
  driver_->driver_ok();
  EXPECT_TRUE(driver_->status() & kStatusNeedsReset);
}

TEST_F(VirtioBlkTest, QueueSizeAboveMaximumNeedsReset) {
  start();
  ASSERT_TRUE(driver_->negotiate(linux_features(driver_->device_features())));
  DriverQueue big(m_.memory, 512, 0x100000, 0x104000, 0x106000);
  driver_->setup_queue(0, big);
  driver_->driver_ok();
  EXPECT_TRUE(driver_->status() & kStatusNeedsReset);
}

TEST_F(VirtioBlkTest, UsedRingOutsideMemoryNeedsReset) {
  start();
  ASSERT_TRUE(driver_->negotiate(linux_features(driver_->device_features())));
  DriverQueue queue(m_.memory, kQueueSize, 0x100000, 0x101000, m_.memory.end() - 64);
  driver_->setup_queue(0, queue);
  driver_->driver_ok();
  EXPECT_TRUE(driver_->status() & kStatusNeedsReset);
}

TEST_F(VirtioBlkTest, MultiQueueServesEachQueue) {
  start(BlockConfig{.serial = "", .num_queues = 2});
  bring_up();
  EXPECT_EQ(request(kBlkTypeIn, 3, 512, true, /*queue=*/1).status, kBlkStatusOk);
  EXPECT_EQ(queues_[1]->used_idx(), 1);
  EXPECT_EQ(queues_[0]->used_idx(), 0);
  EXPECT_TRUE(driver_->vector(2).wait_triggers(1));
}

TEST_F(VirtioBlkTest, NotifyRegistrarFollowsTheBar) {
  start();
  uint64_t notify = driver_->notify_address(0);
  {
    std::lock_guard lock(m_.notify.mutex);
    ASSERT_EQ(m_.notify.registered.count(notify), 1u);
    EXPECT_EQ(m_.notify.registered[notify].second, transport_->queue_eventfd(0));
    EXPECT_EQ(m_.notify.registered[notify].first, 2u);
  }
  bring_up();
  // An ioeventfd signal (no trapped MMIO write) also gets the request processed.
  write_header(kBlkTypeFlush, 0);
  queues_[0]->add_chain({{kHeader, 16, false}, {kStatus, 1, true}}, 0);
  uint64_t one = 1;
  ASSERT_EQ(::write(transport_->queue_eventfd(0), &one, 8), 8);
  EXPECT_TRUE(VirtioPciTestDriver::wait_used(*queues_[0], 1));

  // The guest moves the BAR: registrations move with it.
  uint64_t moved = pci::kMmio64WindowBase + 0x10'0000;
  driver_->config_write(0x10, uint32_t(moved) | 0x4);
  driver_->config_write(0x14, uint32_t(moved >> 32));
  std::lock_guard lock(m_.notify.mutex);
  EXPECT_EQ(m_.notify.registered.count(notify), 0u);
  EXPECT_EQ(m_.notify.registered.count(moved + (notify - driver_->base())), 1u);
}

TEST_F(VirtioBlkTest, ResetStopsTheDeviceAndClearsState) {
  start();
  bring_up();
  EXPECT_EQ(request(kBlkTypeIn, 0, 512, true).status, kBlkStatusOk);
  driver_->set_status(0);
  EXPECT_EQ(driver_->status(), 0);
  EXPECT_EQ(transport_->acked_features(), 0u);
  // Requests after reset are not processed.
  uint16_t used = queues_[0]->used_idx();
  write_header(kBlkTypeFlush, 0);
  queues_[0]->add_chain({{kHeader, 16, false}, {kStatus, 1, true}}, 2);
  driver_->notify(0);
  EXPECT_FALSE(VirtioPciTestDriver::wait_used(*queues_[0], uint16_t(used + 1),
                                              std::chrono::milliseconds(50)));
}

TEST_F(VirtioBlkTest, SynchronousBackendCompletesInline) {
  start({}, false, /*async=*/false);
  bring_up();
  for (int i = 0; i < 40; ++i)  // more than the queue size: wraps the rings
    ASSERT_EQ(request(kBlkTypeIn, uint64_t(i), 512, true).status, kBlkStatusOk);
}

TEST_F(VirtioBlkTest, SaveRestoreResumesOnTheSameRings) {
  start();
  bring_up();
  EXPECT_EQ(request(kBlkTypeIn, 0, 512, true).status, kBlkStatusOk);
  VirtioPciState state = transport_->save();
  EXPECT_EQ(state.queues[0].next_used, 1);

  // A second transport + device in another slot takes over the saved state.
  auto blk = std::make_shared<VirtioBlock>(disk_, BlockConfig{});
  auto transport = std::make_shared<VirtioPciDevice>(blk, m_.memory, m_.msi, m_.loop);
  driver_->set_status(0);  // quiesce the original
  transport->restore(state);
  EXPECT_TRUE(transport->device_status() & kStatusDriverOk);
  write_header(kBlkTypeFlush, 0);
  queues_[0]->add_chain({{kHeader, 16, false}, {kStatus, 1, true}}, 4);
  uint64_t one = 1;
  ASSERT_EQ(::write(transport->queue_eventfd(0), &one, 8), 8);
  EXPECT_TRUE(VirtioPciTestDriver::wait_used(*queues_[0], 2));
  EXPECT_EQ(*m_.memory.read_obj<uint8_t>(kStatus), kBlkStatusOk);
}

}  // namespace
}  // namespace kiln::devices::virtio
