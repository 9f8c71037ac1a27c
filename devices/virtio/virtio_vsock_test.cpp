#include "devices/virtio/virtio_vsock.h"

#include <gtest/gtest.h>
#include <sys/eventfd.h>

#include <stdexcept>

#include "devices/virtio/test_driver.h"

namespace kiln::devices::virtio {
namespace {

using namespace testing;

// Stands in for vhost-vsock: records what the device hands over.
struct FakeBackendState {
  std::mutex mutex;
  uint64_t features = kFeatureVersion1 | kFeatureRingEventIdx | kFeatureRingIndirectDesc;
  bool fail_start = false;
  int starts = 0, stops = 0;
  std::vector<uint16_t> stopped_at = {0, 0};  // what stop() reports as the kernel's avail indexes
  VsockStart last;
};

// Shares the state with the test: the device (kept alive by the bus in TestMachine) may stop
// its back-end after the test's own members are gone.
class FakeBackend : public VsockBackend {
 public:
  explicit FakeBackend(std::shared_ptr<FakeBackendState> state)
      : state_(std::move(state)), s_(*state_) {}
  uint64_t features() const override { return s_.features; }
  void start(const VsockStart& start) override {
    std::lock_guard lock(s_.mutex);
    if (s_.fail_start) throw std::runtime_error("VHOST_SET_MEM_TABLE: no");
    s_.starts++;
    s_.last = start;
  }
  std::vector<uint16_t> stop() override {
    std::lock_guard lock(s_.mutex);
    s_.stops++;
    return s_.stopped_at;
  }

 private:
  std::shared_ptr<FakeBackendState> state_;
  FakeBackendState& s_;
};

uint64_t eventfd_count(int fd) {
  uint64_t value = 0;
  return ::read(fd, &value, sizeof(value)) == sizeof(value) ? value : 0;
}

struct VsockGuest {
  VsockGuest()
      : vsock(std::make_shared<VirtioVsock>(42, std::make_unique<FakeBackend>(backend_state),
                                            m.loop)),
        transport(std::make_shared<VirtioPciDevice>(vsock, m.memory, m.msi, m.loop, &m.notify)),
        driver(m, m.root.add(transport)),
        rx(m.memory, 64, 0x100000, 0x101000, 0x102000),
        tx(m.memory, 64, 0x110000, 0x111000, 0x112000),
        event(m.memory, 8, 0x120000, 0x121000, 0x122000) {
    driver.probe();
  }
  bool bring_up() {
    if (!driver.negotiate(kFeatureVersion1 | kFeatureRingEventIdx)) return false;
    driver.setup_queue(kVsockRxQueue, rx);
    driver.setup_queue(kVsockTxQueue, tx);
    driver.setup_queue(kVsockEventQueue, event);
    driver.driver_ok();
    return true;
  }

  TestMachine m;
  std::shared_ptr<FakeBackendState> backend_state = std::make_shared<FakeBackendState>();
  FakeBackendState& backend = *backend_state;
  std::shared_ptr<VirtioVsock> vsock;
  std::shared_ptr<VirtioPciDevice> transport;
  VirtioPciTestDriver driver;
  DriverQueue rx, tx, event;
};

TEST(VirtioVsock, ConfigHasTheGuestCidAndFeaturesFollowTheBackend) {
  VsockGuest g;
  EXPECT_EQ(g.driver.config_read(0x00), 0x1053'1AF4u);  // 0x1040 + 19
  EXPECT_EQ(g.driver.device_config(0, 4), 42u);
  EXPECT_EQ(g.driver.device_config(4, 4), 0u);
  EXPECT_EQ(g.driver.device_features(),
            kFeatureVersion1 | kFeatureRingEventIdx | kFeatureRingIndirectDesc);
  auto plain = std::make_shared<FakeBackendState>();
  plain->features = kFeatureVersion1;
  VirtioVsock limited(3, std::make_unique<FakeBackend>(plain), g.m.loop);
  EXPECT_EQ(limited.device_features(), kFeatureVersion1);
}

TEST(VirtioVsock, DriverOkHandsRxAndTxToTheBackend) {
  VsockGuest g;
  ASSERT_TRUE(g.bring_up());
  EXPECT_FALSE(g.driver.status() & kStatusNeedsReset);
  std::lock_guard lock(g.backend.mutex);
  ASSERT_EQ(g.backend.starts, 1);
  const VsockStart& s = g.backend.last;
  EXPECT_EQ(s.features, kFeatureVersion1 | kFeatureRingEventIdx);
  EXPECT_EQ(s.memory, &g.m.memory);
  ASSERT_EQ(s.rings.size(), 2u);
  EXPECT_EQ(s.rings[0].index, kVsockRxQueue);
  EXPECT_EQ(s.rings[1].index, kVsockTxQueue);
  EXPECT_EQ(s.rings[1].size, 64);
  EXPECT_EQ(s.rings[1].next_avail, 0);
  EXPECT_EQ(s.rings[1].desc_host,
            reinterpret_cast<uint64_t>(g.m.memory.slice(0x110000, 1)->data()));
  EXPECT_EQ(s.rings[1].avail_host,
            reinterpret_cast<uint64_t>(g.m.memory.slice(0x111000, 1)->data()));
  EXPECT_EQ(s.rings[1].used_host,
            reinterpret_cast<uint64_t>(g.m.memory.slice(0x112000, 1)->data()));
  EXPECT_GE(s.rings[0].kick_fd, 0);
  EXPECT_NE(s.rings[0].kick_fd, s.rings[1].kick_fd);
  EXPECT_NE(s.rings[0].call_fd, s.rings[1].call_fd);
}

TEST(VirtioVsock, KicksGoStraightToTheBackendAndInterruptsAreRelayedWithoutAnIrqfd) {
  VsockGuest g;
  ASSERT_TRUE(g.bring_up());
  VsockRing tx, rx;
  {
    std::lock_guard lock(g.backend.mutex);
    rx = g.backend.last.rings[0];
    tx = g.backend.last.rings[1];
  }
  // vhost-vsock waits on the transport's notification eventfds (KVM ioeventfds in kiln).
  EXPECT_EQ(rx.kick_fd, g.transport->queue_eventfd(kVsockRxQueue));
  EXPECT_EQ(tx.kick_fd, g.transport->queue_eventfd(kVsockTxQueue));
  EXPECT_EQ(g.vsock->metrics().direct_kicks, 2u);
  EXPECT_GE(eventfd_count(tx.kick_fd), 1u);  // the kick given at start
  g.driver.notify(kVsockTxQueue);
  uint64_t kicked = 0;
  for (int i = 0; i < 500 && !kicked; ++i, usleep(1000)) kicked = eventfd_count(tx.kick_fd);
  EXPECT_GE(kicked, 1u);
  usleep(20000);
  EXPECT_EQ(g.vsock->metrics().kicks, 0u);  // the loop did not take it
  // FakeMsiVector has no irqfd by default: kiln relays the back-end's interrupts.
  EXPECT_EQ(g.vsock->metrics().direct_calls, 0u);
  int before = g.driver.vector(1 + kVsockRxQueue).triggers;
  uint64_t one = 1;
  ASSERT_EQ(::write(rx.call_fd, &one, sizeof(one)), 8);  // the back-end used rx buffers
  EXPECT_TRUE(g.driver.vector(1 + kVsockRxQueue).wait_triggers(before + 1));
  EXPECT_EQ(g.vsock->metrics().calls, 1u);
}

TEST(VirtioVsock, InterruptsGoStraightToTheVectorsIrqfdWhenItHasOne) {
  VsockGuest g;
  UniqueFd rx_irqfd(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)), tx_irqfd(eventfd(0, EFD_CLOEXEC));
  // Vector 0 is the config vector; the test driver gives queue q vector 1 + q.
  g.m.msi.vectors.at(1 + kVsockRxQueue)->direct_fd = rx_irqfd.get();
  g.m.msi.vectors.at(1 + kVsockTxQueue)->direct_fd = tx_irqfd.get();
  ASSERT_TRUE(g.bring_up());
  std::lock_guard lock(g.backend.mutex);
  EXPECT_EQ(g.backend.last.rings[0].call_fd, rx_irqfd.get());
  EXPECT_EQ(g.backend.last.rings[1].call_fd, tx_irqfd.get());
  EXPECT_EQ(g.vsock->metrics().direct_calls, 2u);
}

// A call the back-end raised just before it stopped still reaches the driver.
TEST(VirtioVsock, PauseDeliversARelayedInterruptRaisedBeforeTheStop) {
  VsockGuest g;
  ASSERT_TRUE(g.bring_up());
  int call_fd;
  {
    std::lock_guard lock(g.backend.mutex);
    call_fd = g.backend.last.rings[kVsockTxQueue].call_fd;
  }
  const int before = g.driver.vector(1 + kVsockTxQueue).triggers;
  g.m.loop.join_thread();  // nothing relays it but pause()
  uint64_t one = 1;
  ASSERT_EQ(::write(call_fd, &one, sizeof(one)), 8);
  g.vsock->pause();
  EXPECT_EQ(g.driver.vector(1 + kVsockTxQueue).triggers, before + 1);
}

TEST(VirtioVsock, EventBuffersAreKeptAndResetStopsTheBackend) {
  VsockGuest g;
  ASSERT_TRUE(g.bring_up());
  g.event.add_chain({{0x130000, 4, true}}, 0);
  g.event.add_chain({{0x130010, 4, true}}, 1);
  g.driver.notify(kVsockEventQueue);
  for (int i = 0; i < 500 && g.vsock->event_buffers() < 2; ++i) usleep(1000);
  EXPECT_EQ(g.vsock->event_buffers(), 2u);
  EXPECT_EQ(g.event.used_idx(), 0);
  g.driver.set_status(0);
  EXPECT_EQ(g.vsock->event_buffers(), 0u);
  {
    std::lock_guard lock(g.backend.mutex);
    EXPECT_EQ(g.backend.stops, 1);
  }
  // The driver comes back (as after a guest reboot): a fresh start.
  ASSERT_TRUE(g.bring_up());
  std::lock_guard lock(g.backend.mutex);
  EXPECT_EQ(g.backend.starts, 2);
}

// Pausing takes the rings back from the kernel where it got to (avail index from the back-end,
// used index from the ring), so a saved queue state is exact; resuming restarts from there.
TEST(VirtioVsock, PauseTakesTheRingsBackAndResumeHandsThemOver) {
  VsockGuest g;
  ASSERT_TRUE(g.bring_up());
  g.backend.stopped_at = {5, 7};
  g.m.memory.write_obj<uint16_t>(0x101000 + 2, 6);  // avail idx: the driver posted 6 and 8
  g.m.memory.write_obj<uint16_t>(0x111000 + 2, 8);
  g.m.memory.write_obj<uint16_t>(0x102000 + 2, 4);  // rx used idx, as the kernel left it
  g.m.memory.write_obj<uint16_t>(0x112000 + 2, 7);  // tx
  g.vsock->pause();
  g.vsock->pause();  // idempotent
  EXPECT_EQ(g.backend.stops, 1);
  EXPECT_EQ(g.backend.starts, 1);
  g.vsock->resume();
  std::lock_guard lock(g.backend.mutex);
  EXPECT_EQ(g.backend.starts, 2);
  ASSERT_EQ(g.backend.last.rings.size(), 2u);
  EXPECT_EQ(g.backend.last.rings[0].next_avail, 5);
  EXPECT_EQ(g.backend.last.rings[1].next_avail, 7);
  EXPECT_FALSE(g.driver.status() & kStatusNeedsReset);
}

TEST(VirtioVsock, BackendFailureMeansNeedsReset) {
  VsockGuest g;
  g.backend.fail_start = true;
  g.bring_up();
  EXPECT_TRUE(g.driver.status() & kStatusNeedsReset);
  EXPECT_EQ(g.vsock->metrics().starts, 0u);
}

TEST(VirtioVsock, BrokenEventQueueNeedsReset) {
  VsockGuest g;
  ASSERT_TRUE(g.bring_up());
  g.event.add_chain({{g.m.memory.end() - 2, 64, true}}, 0);
  g.driver.notify(kVsockEventQueue);
  for (int i = 0; i < 500 && !(g.driver.status() & kStatusNeedsReset); ++i) usleep(1000);
  EXPECT_TRUE(g.driver.status() & kStatusNeedsReset);
}

}  // namespace
}  // namespace kiln::devices::virtio
