#include "devices/virtio/virtio_rng.h"

#include <gtest/gtest.h>

#include "devices/virtio/test_driver.h"

namespace kiln::devices::virtio {
namespace {

using namespace testing;

TEST(VirtioRng, FillsGuestBuffersWithRandomBytes) {
  TestMachine m;
  auto rng = std::make_shared<VirtioRng>();
  auto transport = std::make_shared<VirtioPciDevice>(rng, m.memory, m.msi, m.loop, &m.notify);
  VirtioPciTestDriver driver(m, m.root.add(transport));
  driver.probe();
  EXPECT_EQ(driver.config_read(0x00), 0x1044'1AF4u);
  DriverQueue queue(m.memory, 8, 0x100000, 0x101000, 0x102000);
  ASSERT_TRUE(driver.negotiate(kFeatureVersion1 | kFeatureRingEventIdx));
  driver.setup_queue(0, queue);
  driver.driver_ok();

  std::vector<uint8_t> zeros(256, 0);
  m.memory.write(0x20000, zeros);
  m.memory.write(0x30000, zeros);
  queue.add_chain({{0x20000, 200, true}, {0x20100, 56, true}}, 0);
  queue.add_chain({{0x30000, 256, true}}, 2);
  driver.notify(0);
  ASSERT_TRUE(VirtioPciTestDriver::wait_used(queue, 2));
  EXPECT_EQ(queue.used_element(0), std::make_pair(0u, 256u));
  EXPECT_EQ(queue.used_element(1), std::make_pair(2u, 256u));
  std::vector<uint8_t> first(256), second(256);
  m.memory.read(0x20000, std::span(first).first(200));
  m.memory.read(0x20100, std::span(first).subspan(200, 56));
  m.memory.read(0x30000, second);
  EXPECT_NE(first, zeros);
  EXPECT_NE(second, zeros);
  EXPECT_NE(first, second);
  EXPECT_EQ(rng->metrics().bytes, 512u);
  EXPECT_TRUE(driver.vector(1).wait_triggers(1));
}

TEST(VirtioRng, BrokenChainNeedsReset) {
  TestMachine m;
  auto rng = std::make_shared<VirtioRng>();
  auto transport = std::make_shared<VirtioPciDevice>(rng, m.memory, m.msi, m.loop);
  VirtioPciTestDriver driver(m, m.root.add(transport));
  driver.probe();
  DriverQueue queue(m.memory, 8, 0x100000, 0x101000, 0x102000);
  ASSERT_TRUE(driver.negotiate(kFeatureVersion1));
  driver.setup_queue(0, queue);
  driver.driver_ok();
  queue.add_chain({{m.memory.end() - 4, 64, true}}, 0);  // runs off the end of RAM
  driver.notify(0);
  for (int i = 0; i < 500 && !(driver.status() & kStatusNeedsReset); ++i) usleep(1000);
  EXPECT_TRUE(driver.status() & kStatusNeedsReset);
  EXPECT_EQ(queue.used_idx(), 0);
}

}  // namespace
}  // namespace kiln::devices::virtio
