#include "devices/virtio/virtio_console.h"

#include <gtest/gtest.h>

#include <string>

#include "devices/virtio/test_driver.h"

namespace kiln::devices::virtio {
namespace {

using namespace testing;

class VirtioConsoleTest : public ::testing::Test {
 protected:
  void SetUp() override {
    console_ = std::make_shared<VirtioConsole>([this](std::span<const uint8_t> bytes) {
      std::lock_guard lock(mutex_);
      output_.append(bytes.begin(), bytes.end());
    });
    transport_ = std::make_shared<VirtioPciDevice>(console_, m_.memory, m_.msi, m_.loop);
    driver_ = std::make_unique<VirtioPciTestDriver>(m_, m_.root.add(transport_));
    driver_->probe();
    ASSERT_TRUE(driver_->negotiate(kFeatureVersion1 | kFeatureRingEventIdx));
    driver_->setup_queue(kConsoleReceiveQueue, rx_);
    driver_->setup_queue(kConsoleTransmitQueue, tx_);
  }
  std::string output() {
    std::lock_guard lock(mutex_);
    return output_;
  }

  TestMachine m_;
  DriverQueue rx_{m_.memory, 8, 0x100000, 0x101000, 0x102000};
  DriverQueue tx_{m_.memory, 8, 0x110000, 0x111000, 0x112000};
  std::shared_ptr<VirtioConsole> console_;
  std::shared_ptr<VirtioPciDevice> transport_;
  std::unique_ptr<VirtioPciTestDriver> driver_;
  std::mutex mutex_;
  std::string output_;
};

TEST_F(VirtioConsoleTest, GuestOutputReachesTheSink) {
  driver_->driver_ok();
  EXPECT_EQ(driver_->config_read(0x00), 0x1043'1AF4u);
  EXPECT_EQ(driver_->device_config(4, 4), 1u);  // max_nr_ports
  std::string hello = "hello from hvc0\n";
  m_.memory.write(0x20000, std::span(reinterpret_cast<const uint8_t*>(hello.data()), 6));
  m_.memory.write(0x21000,
                  std::span(reinterpret_cast<const uint8_t*>(hello.data()) + 6, hello.size() - 6));
  tx_.add_chain({{0x20000, 6, false}, {0x21000, uint32_t(hello.size() - 6), false}}, 0);
  driver_->notify(kConsoleTransmitQueue);
  ASSERT_TRUE(VirtioPciTestDriver::wait_used(tx_, 1));
  EXPECT_EQ(output(), hello);
  EXPECT_EQ(console_->metrics().tx_bytes, hello.size());
}

TEST_F(VirtioConsoleTest, HostInputFillsReceiveBuffersInOrder) {
  std::string early = "typed before boot;";
  console_->enqueue_input(std::span(reinterpret_cast<const uint8_t*>(early.data()), early.size()));
  driver_->driver_ok();
  rx_.add_chain({{0x30000, 8, true}}, 0);
  rx_.add_chain({{0x31000, 64, true}}, 1);
  driver_->notify(kConsoleReceiveQueue);
  ASSERT_TRUE(VirtioPciTestDriver::wait_used(rx_, 2));
  EXPECT_EQ(rx_.used_element(0), std::make_pair(0u, 8u));
  EXPECT_EQ(rx_.used_element(1), std::make_pair(1u, uint32_t(early.size() - 8)));
  std::string got(early.size(), '\0');
  m_.memory.read(0x30000, std::span(reinterpret_cast<uint8_t*>(got.data()), 8));
  m_.memory.read(0x31000, std::span(reinterpret_cast<uint8_t*>(got.data()) + 8, got.size() - 8));
  EXPECT_EQ(got, early);

  // Later input with a buffer already waiting is delivered right away.
  rx_.add_chain({{0x32000, 16, true}}, 2);
  driver_->notify(kConsoleReceiveQueue);
  std::string key = "x";
  console_->enqueue_input(std::span(reinterpret_cast<const uint8_t*>(key.data()), 1));
  ASSERT_TRUE(VirtioPciTestDriver::wait_used(rx_, 3));
  EXPECT_EQ(*m_.memory.read_obj<uint8_t>(0x32000), 'x');
}

TEST_F(VirtioConsoleTest, PendingInputSurvivesSaveRestore) {
  std::string text = "abc";
  console_->enqueue_input(std::span(reinterpret_cast<const uint8_t*>(text.data()), text.size()));
  ConsoleState state = console_->save();
  VirtioConsole other(nullptr);
  other.restore(state);
  EXPECT_EQ(other.save().pending_input, std::vector<uint8_t>({'a', 'b', 'c'}));
  state.version = 99;
  EXPECT_THROW(other.restore(state), std::invalid_argument);
}

}  // namespace
}  // namespace kiln::devices::virtio
