#include "devices/virtio/virtio_balloon.h"

#include <gtest/gtest.h>

#include "devices/virtio/test_driver.h"

namespace kiln::devices::virtio {
namespace {

using namespace testing;

constexpr uint64_t kRam = 16 << 20;
constexpr uint64_t kPfnBuffer = 0x10000;

// A guest with the balloon driver up: inflate/deflate (and stats, if asked) queues set up.
struct BalloonGuest {
  explicit BalloonGuest(bool stats = false, uint64_t ring_features = 0)
      : balloon(std::make_shared<VirtioBalloon>(kRam)),
        transport(std::make_shared<VirtioPciDevice>(balloon, m.memory, m.msi, m.loop, &m.notify)),
        driver(m, m.root.add(transport)),
        inflate(m.memory, 8, 0x100000, 0x101000, 0x102000),
        deflate(m.memory, 8, 0x110000, 0x111000, 0x112000),
        statsq(m.memory, 8, 0x120000, 0x121000, 0x122000) {
    driver.probe();
    uint64_t features = kFeatureVersion1 | ring_features | (stats ? kBalloonFeatureStatsVq : 0);
    EXPECT_TRUE(driver.negotiate(features));
    driver.setup_queue(kBalloonInflateQueue, inflate);
    driver.setup_queue(kBalloonDeflateQueue, deflate);
    if (stats) driver.setup_queue(kBalloonStatsQueue, statsq);
    driver.driver_ok();
  }

  // Hands `pfns` to queue `index` in one buffer at `at` and waits for the device to use it.
  bool send_pfns(uint16_t index, DriverQueue& queue, const std::vector<uint32_t>& pfns,
                 uint16_t head, uint64_t at = kPfnBuffer) {
    m.memory.write(at, {reinterpret_cast<const uint8_t*>(pfns.data()), pfns.size() * 4});
    uint16_t before = queue.used_idx();
    queue.add_chain({{at, uint32_t(pfns.size() * 4), false}}, head);
    driver.notify(index);
    return VirtioPciTestDriver::wait_used(queue, uint16_t(before + 1));
  }

  void fill_page(uint64_t gpa, uint8_t value) {
    std::vector<uint8_t> page(4096, value);
    m.memory.write(gpa, page);
  }
  bool page_is(uint64_t gpa, uint8_t value) {
    std::vector<uint8_t> page(4096);
    m.memory.read(gpa, page);
    return std::all_of(page.begin(), page.end(), [value](uint8_t b) { return b == value; });
  }

  TestMachine m{kRam};
  std::shared_ptr<VirtioBalloon> balloon;
  std::shared_ptr<VirtioPciDevice> transport;
  VirtioPciTestDriver driver;
  DriverQueue inflate, deflate, statsq;
};

TEST(VirtioBalloon, AdvertisesItselfAndItsFeatures) {
  BalloonGuest g;
  EXPECT_EQ(g.driver.config_read(0x00), 0x1045'1AF4u);  // virtio 1.x id 0x1040 + 5
  uint64_t features = g.driver.device_features();
  EXPECT_TRUE(features & kFeatureVersion1);
  EXPECT_TRUE(features & kBalloonFeatureStatsVq);
  EXPECT_FALSE(features & kBalloonFeatureDeflateOnOom);
  EXPECT_FALSE(features & kBalloonFeatureMustTellHost);
  EXPECT_TRUE(VirtioBalloon(kRam, true).device_features() & kBalloonFeatureDeflateOnOom);
}

TEST(VirtioBalloon, InflateGivesThePagesBackToTheHost) {
  BalloonGuest g;
  for (uint64_t gpa = 0x200000; gpa <= 0x204000; gpa += 0x1000) g.fill_page(gpa, 0xAB);
  g.fill_page(0x300000, 0xCD);
  // A run of four and a lone page, out of order.
  ASSERT_TRUE(g.send_pfns(kBalloonInflateQueue, g.inflate, {0x300, 0x200, 0x201, 0x202, 0x203}, 0));
  EXPECT_EQ(g.inflate.used_element(0), std::make_pair(0u, 0u));
  for (uint64_t gpa = 0x200000; gpa < 0x204000; gpa += 0x1000) EXPECT_TRUE(g.page_is(gpa, 0));
  EXPECT_TRUE(g.page_is(0x300000, 0));
  EXPECT_TRUE(g.page_is(0x204000, 0xAB));  // not in the balloon: untouched
  EXPECT_EQ(g.balloon->metrics().inflated_pages, 5u);
  EXPECT_EQ(g.balloon->metrics().discarded_pages, 5u);
  EXPECT_EQ(g.balloon->metrics().bad_pages, 0u);
  EXPECT_TRUE(g.driver.vector(1 + kBalloonInflateQueue).wait_triggers(1));
}

TEST(VirtioBalloon, PagesOutsideGuestRamAreRefusedOneByOne) {
  BalloonGuest g;
  g.fill_page(0x400000, 0x11);
  uint32_t last = uint32_t(kRam >> 12) - 1;
  g.fill_page(uint64_t(last) << 12, 0x22);
  // The run last..last+2 leaves RAM: only its first page is released.
  ASSERT_TRUE(g.send_pfns(kBalloonInflateQueue, g.inflate,
                          {last, last + 1, last + 2, 0xFFFFFFFF, 0x400}, 3));
  EXPECT_TRUE(g.page_is(uint64_t(last) << 12, 0));
  EXPECT_TRUE(g.page_is(0x400000, 0));
  EXPECT_EQ(g.balloon->metrics().discarded_pages, 2u);
  EXPECT_EQ(g.balloon->metrics().bad_pages, 3u);
  EXPECT_FALSE(g.driver.status() & kStatusNeedsReset);
}

TEST(VirtioBalloon, DeflateIsAccepted) {
  BalloonGuest g;
  g.fill_page(0x500000, 0x33);
  ASSERT_TRUE(g.send_pfns(kBalloonDeflateQueue, g.deflate, {0x500, 0x501}, 1));
  EXPECT_EQ(g.deflate.used_element(0), std::make_pair(1u, 0u));
  EXPECT_TRUE(g.page_is(0x500000, 0x33));  // deflate never touches memory
  EXPECT_EQ(g.balloon->metrics().deflated_pages, 2u);
}

TEST(VirtioBalloon, TargetAndActualThroughConfigSpace) {
  BalloonGuest g;
  std::vector<uint64_t> reported;
  g.balloon->set_actual_listener([&](uint64_t bytes) { reported.push_back(bytes); });
  EXPECT_EQ(g.driver.device_config(0, 4), 0u);
  EXPECT_EQ(g.balloon->actual_bytes(), kRam);
  int before = g.driver.vector(0).triggers;
  g.balloon->set_target(kRam - (8 << 20));
  EXPECT_EQ(g.driver.device_config(0, 4), 2048u);
  EXPECT_GT(g.driver.vector(0).triggers, before);  // configuration-change interrupt
  // The driver reports what it inflated; num_pages is read-only for it.
  g.driver.write(g.driver.base() + kDeviceCfgOffset + 4, 1024, 4);
  g.driver.write(g.driver.base() + kDeviceCfgOffset + 0, 7, 4);
  EXPECT_EQ(g.driver.device_config(4, 4), 1024u);
  EXPECT_EQ(g.driver.device_config(0, 4), 2048u);
  EXPECT_EQ(g.balloon->actual_bytes(), kRam - (4 << 20));
  g.driver.write(g.driver.base() + kDeviceCfgOffset + 4, 1024, 4);  // unchanged: no event
  EXPECT_EQ(reported, std::vector<uint64_t>{kRam - (4 << 20)});
  g.balloon->set_target(kRam * 4);  // more than the guest has: an empty balloon
  EXPECT_EQ(g.driver.device_config(0, 4), 0u);
  // A reset hands every page back.
  g.driver.set_status(0);
  EXPECT_EQ(g.balloon->actual_bytes(), kRam);
}

TEST(VirtioBalloon, StatisticsAreHeldAndReturnedOnRequest) {
  BalloonGuest g(true);
  EXPECT_FALSE(g.balloon->request_stats());  // nothing posted yet
  auto post = [&](uint64_t free_bytes, uint16_t head) {
    uint8_t buf[2 * kBalloonStatSize] = {};
    auto put = [&](size_t i, BalloonStat tag, uint64_t value) {
      buf[i * kBalloonStatSize] = uint8_t(tag);
      for (int b = 0; b < 8; ++b) buf[i * kBalloonStatSize + 2 + b] = uint8_t(value >> (8 * b));
    };
    put(0, BalloonStat::kFreeMemory, free_bytes);
    put(1, BalloonStat::kTotalMemory, 15 << 20);
    g.m.memory.write(0x130000, buf);
    g.statsq.add_chain({{0x130000, sizeof(buf), false}}, head);
    g.driver.notify(kBalloonStatsQueue);
  };
  EXPECT_EQ(g.balloon->stats().updated_at, 0);
  const int64_t before = int64_t(time(nullptr));
  post(3 << 20, 0);
  for (int i = 0; i < 500 && g.balloon->metrics().stats_updates == 0; ++i) usleep(1000);
  auto stats = g.balloon->stats();
  EXPECT_EQ(stats.values[uint16_t(BalloonStat::kFreeMemory)], 3u << 20);
  EXPECT_EQ(stats.values[uint16_t(BalloonStat::kTotalMemory)], 15u << 20);
  EXPECT_EQ(stats.values.size(), 2u);  // tags the guest did not send stay unknown
  EXPECT_GE(stats.updated_at, before);
  EXPECT_LE(stats.updated_at, int64_t(time(nullptr)));
  EXPECT_EQ(g.statsq.used_idx(), 0);  // the device keeps the buffer until it wants new figures
  ASSERT_TRUE(g.balloon->request_stats());
  EXPECT_EQ(g.statsq.used_idx(), 1);
  EXPECT_FALSE(g.balloon->request_stats());  // the driver has not refilled it yet
  post(5 << 20, 1);
  for (int i = 0; i < 500 && g.balloon->metrics().stats_updates < 2; ++i) usleep(1000);
  EXPECT_EQ(g.balloon->stats().values[uint16_t(BalloonStat::kFreeMemory)], 5u << 20);
}

// Under EVENT_IDX the driver kicks for its refilled buffer only if the device asked for it
// through avail_event (spec 2.7.10): a Linux guest's second report depends on this.
TEST(VirtioBalloon, StatisticsQueueAsksForTheNextKick) {
  BalloonGuest g(true, kFeatureRingEventIdx);
  uint8_t buf[kBalloonStatSize] = {uint8_t(BalloonStat::kFreeMemory)};
  g.m.memory.write(0x130000, buf);
  g.statsq.add_chain({{0x130000, sizeof(buf), false}}, 0);
  g.driver.notify(kBalloonStatsQueue);
  for (int i = 0; i < 500 && g.balloon->metrics().stats_updates == 0; ++i) usleep(1000);
  ASSERT_EQ(g.balloon->metrics().stats_updates, 1u);
  const uint64_t avail_event = 0x122000 + 4 + 8 * 8;  // after the 8 used elements
  EXPECT_EQ(g.m.memory.read_obj<uint16_t>(avail_event),
            std::optional<uint16_t>(1));  // wants a kick for buffer 2
}

TEST(VirtioBalloon, BrokenChainNeedsReset) {
  BalloonGuest g;
  g.inflate.add_chain({{g.m.memory.end() - 4, 64, false}}, 0);  // runs off the end of RAM
  g.driver.notify(kBalloonInflateQueue);
  for (int i = 0; i < 500 && !(g.driver.status() & kStatusNeedsReset); ++i) usleep(1000);
  EXPECT_TRUE(g.driver.status() & kStatusNeedsReset);
  EXPECT_EQ(g.inflate.used_idx(), 0);
}

TEST(VirtioBalloon, StateRoundTrips) {
  VirtioBalloon a(kRam), b(kRam);
  a.set_target(kRam / 2);
  b.restore(a.save());
  EXPECT_EQ(b.target_pages(), uint32_t(kRam / 2 >> 12));
  BalloonState bad;
  bad.version = 99;
  EXPECT_THROW(b.restore(bad), std::invalid_argument);
}

}  // namespace
}  // namespace kiln::devices::virtio
