#include "devices/virtio/virtio_net.h"

#include <gtest/gtest.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <mutex>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "devices/virtio/test_driver.h"

namespace kiln::devices::virtio {
namespace {

using namespace testing;

// The tap's framing without a tap: a datagram socketpair moves one frame (virtio_net_hdr
// first) per readv/writev, and truncates like a tap when the reader's buffer is short.
class SocketBackend : public NetBackend {
 public:
  explicit SocketBackend(int fd, std::atomic<uint32_t>& offloads) : fd_(fd), offloads_(offloads) {}
  int fd() const override { return fd_.get(); }
  // Refuses (as a tap whose host lacks an offload) while `offloads` holds kRefuseOffloads.
  static constexpr uint32_t kRefuseOffloads = 0xDEAD;
  bool set_offloads(uint32_t flags) override {
    if (offloads_ == kRefuseOffloads) return false;
    offloads_ = flags;
    return true;
  }

 private:
  UniqueFd fd_;
  std::atomic<uint32_t>& offloads_;
};

std::vector<uint8_t> bytes(const std::string& text) { return {text.begin(), text.end()}; }

constexpr uint64_t kRxDesc = 0x100000, kTxDesc = 0x110000, kCtrlDesc = 0x120000;
constexpr uint64_t kBuffers = 0x200000;

class VirtioNetTest : public ::testing::Test {
 protected:
  void SetUp() override {
    int pair[2];
    ASSERT_EQ(socketpair(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, pair), 0);
    peer_.reset(pair[1]);
    net_ = std::make_shared<VirtioNet>(std::make_unique<SocketBackend>(pair[0], offloads_),
                                       MacAddress{0x52, 0x54, 0x00, 0x12, 0x34, 0x56}, m_.loop);
    transport_ = std::make_shared<VirtioPciDevice>(net_, m_.memory, m_.msi, m_.loop);
    driver_ = std::make_unique<VirtioPciTestDriver>(m_, m_.root.add(transport_));
    driver_->probe();
  }

  void bring_up(uint64_t features = kFeatureVersion1 | kFeatureRingEventIdx | kNetFeatureMac) {
    ASSERT_TRUE(driver_->negotiate(features));
    driver_->setup_queue(kNetReceiveQueue, rx_);
    driver_->setup_queue(kNetTransmitQueue, tx_);
    if (features & kNetFeatureCtrlVq) driver_->setup_queue(kNetControlQueue, ctrl_);
    driver_->driver_ok();
    ASSERT_EQ(driver_->status() & kStatusDriverOk, kStatusDriverOk);
  }

  // Sends one frame from the host side: a virtio_net_hdr (flags, gso_type, ...) and `frame`.
  void host_send(const std::vector<uint8_t>& frame, uint8_t flags = 0) {
    std::vector<uint8_t> packet(kNetHeaderSize, 0);
    packet[0] = flags;
    packet.insert(packet.end(), frame.begin(), frame.end());
    ASSERT_EQ(::send(peer_.get(), packet.data(), packet.size(), 0), ssize_t(packet.size()));
  }

  // What the device handed to the host side, or empty after `timeout`.
  std::vector<uint8_t> host_receive(std::chrono::milliseconds timeout = std::chrono::seconds(5)) {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    std::vector<uint8_t> buffer(70000);
    while (std::chrono::steady_clock::now() < deadline) {
      ssize_t got = ::recv(peer_.get(), buffer.data(), buffer.size(), 0);
      if (got >= 0) {
        buffer.resize(size_t(got));
        return buffer;
      }
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    return {};
  }

  // Sends a control command (class, command, data) in a chain of `readable` bytes and
  // `writable` ack bytes; returns the ack, or -1 when the device wrote nothing back.
  int control(uint8_t cls, uint8_t command, const std::vector<uint8_t>& data,
              uint32_t writable = 1) {
    constexpr uint64_t kCommand = kBuffers + 0x8000, kAck = kBuffers + 0x9000;
    std::vector<uint8_t> bytes = {cls, command};
    bytes.insert(bytes.end(), data.begin(), data.end());
    m_.memory.write(kCommand, bytes);
    m_.memory.write(kAck, std::vector<uint8_t>{0xAA});
    std::vector<DriverQueue::Buffer> chain = {{kCommand, uint32_t(bytes.size()), false}};
    if (writable) chain.push_back({kAck, writable, true});
    const uint16_t id = control_sent_++;
    ctrl_.add_chain(chain, id);
    driver_->notify(kNetControlQueue);
    if (!VirtioPciTestDriver::wait_used(ctrl_, control_sent_)) return -2;
    const auto [head, written] = ctrl_.used_element(id);
    EXPECT_EQ(head, id);
    return written == 0 ? -1 : guest_read(kAck, 1)[0];
  }
  static std::vector<uint8_t> le64(uint64_t value) {
    std::vector<uint8_t> out(8);
    for (int i = 0; i < 8; ++i) out[size_t(i)] = uint8_t(value >> (8 * i));
    return out;
  }

  // A second device and transport on a new socketpair: where a snapshot or a migration restores.
  struct Destination {
    UniqueFd peer;
    std::unique_ptr<std::atomic<uint32_t>> offloads;  // what the backend was told last
    std::shared_ptr<VirtioNet> net;
    std::shared_ptr<VirtioPciDevice> transport;
  };
  Destination destination() {
    int pair[2];
    if (socketpair(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, pair) != 0)
      throw std::system_error(errno, std::generic_category(), "socketpair");
    Destination d;
    d.peer.reset(pair[1]);
    d.offloads = std::make_unique<std::atomic<uint32_t>>(0xFFFF);
    d.net = std::make_shared<VirtioNet>(std::make_unique<SocketBackend>(pair[0], *d.offloads),
                                        net_->mac(), m_.loop);
    d.transport = std::make_shared<VirtioPciDevice>(d.net, m_.memory, m_.msi, m_.loop);
    return d;
  }

  std::vector<uint8_t> guest_read(uint64_t gpa, size_t len) {
    std::vector<uint8_t> out(len);
    m_.memory.read(gpa, out);
    return out;
  }

  TestMachine m_;
  DriverQueue rx_{m_.memory, 16, kRxDesc, kRxDesc + 0x1000, kRxDesc + 0x2000};
  DriverQueue tx_{m_.memory, 16, kTxDesc, kTxDesc + 0x1000, kTxDesc + 0x2000};
  DriverQueue ctrl_{m_.memory, 16, kCtrlDesc, kCtrlDesc + 0x1000, kCtrlDesc + 0x2000};
  uint16_t control_sent_ = 0;
  std::atomic<uint32_t> offloads_{0xFFFF};
  UniqueFd peer_;
  std::shared_ptr<VirtioNet> net_;
  std::shared_ptr<VirtioPciDevice> transport_;
  std::unique_ptr<VirtioPciTestDriver> driver_;
};

TEST_F(VirtioNetTest, ConfigSpaceHasTheMacAndLinkUp) {
  EXPECT_EQ(driver_->config_read(0x00), 0x1041'1AF4u);  // virtio 1.x network device
  EXPECT_EQ(driver_->config_read(0x08) >> 8, 0x020000u);
  uint64_t features = driver_->device_features();
  EXPECT_TRUE(features & kFeatureVersion1);
  EXPECT_TRUE(features & kNetFeatureMac);
  EXPECT_TRUE(features & kNetFeatureStatus);
  std::vector<uint8_t> mac;
  for (uint32_t i = 0; i < 6; ++i) mac.push_back(uint8_t(driver_->device_config(i, 1)));
  EXPECT_EQ(mac, std::vector<uint8_t>({0x52, 0x54, 0x00, 0x12, 0x34, 0x56}));
  EXPECT_EQ(driver_->device_config(6, 2), kNetStatusLinkUp);
  EXPECT_EQ(driver_->device_config(8, 2), 1u);  // max_virtqueue_pairs
  EXPECT_EQ(driver_->device_config(kNetConfigSize, 2), 0u);
}

TEST_F(VirtioNetTest, DefaultMacIsStableUnicastAndLocallyAdministered) {
  MacAddress a = default_mac("tap0");
  EXPECT_EQ(a, default_mac("tap0"));
  EXPECT_NE(a, default_mac("tap1"));
  EXPECT_EQ(a[0], 0x52);
  EXPECT_EQ(a[1], 0x54);
  EXPECT_EQ(a[2], 0x00);
  EXPECT_EQ(format_mac({0x52, 0x54, 0x00, 0xab, 0x0c, 0x01}), "52:54:00:ab:0c:01");
  EXPECT_EQ(parse_mac("52:54:00:AB:0c:01"), (MacAddress{0x52, 0x54, 0x00, 0xab, 0x0c, 0x01}));
  EXPECT_EQ(parse_mac(format_mac(a)), a);
  EXPECT_EQ(parse_mac("52:54:00:ab:0c"), std::nullopt);
  EXPECT_EQ(parse_mac("52:54:00:ab:0c:0g"), std::nullopt);
  EXPECT_EQ(parse_mac("52-54-00-ab-0c-01"), std::nullopt);
}

TEST_F(VirtioNetTest, TransmittedFrameReachesTheBackendWithItsHeader) {
  bring_up();
  std::vector<uint8_t> header(kNetHeaderSize, 0);
  header[0] = 1;  // NEEDS_CSUM: the tap finishes the checksum
  header[6] = 34;
  header[8] = 16;
  std::vector<uint8_t> frame = bytes(
      "\xff\xff\xff\xff\xff\xff"
      "ethernet frame payload");
  m_.memory.write(kBuffers, header);
  m_.memory.write(kBuffers + 0x1000, std::span(frame).first(10));
  m_.memory.write(kBuffers + 0x2000, std::span(frame).subspan(10));
  tx_.add_chain({{kBuffers, kNetHeaderSize, false},
                 {kBuffers + 0x1000, 10, false},
                 {kBuffers + 0x2000, uint32_t(frame.size() - 10), false}},
                0);
  driver_->notify(kNetTransmitQueue);
  ASSERT_TRUE(VirtioPciTestDriver::wait_used(tx_, 1));
  EXPECT_EQ(tx_.used_element(0), std::make_pair(0u, 0u));
  std::vector<uint8_t> sent = host_receive();
  ASSERT_EQ(sent.size(), kNetHeaderSize + frame.size());
  EXPECT_EQ(std::vector<uint8_t>(sent.begin(), sent.begin() + kNetHeaderSize), header);
  EXPECT_EQ(std::vector<uint8_t>(sent.begin() + kNetHeaderSize, sent.end()), frame);
  EXPECT_EQ(net_->metrics().tx_packets, 1u);
  EXPECT_EQ(net_->metrics().tx_bytes, frame.size());
}

TEST_F(VirtioNetTest, ReceivedFramesLandInGuestBuffersWithHeaderAndLength) {
  bring_up();
  rx_.add_chain({{kBuffers, 2048, true}}, 0);
  // A buffer split right through the header is fine too.
  rx_.add_chain({{kBuffers + 0x1000, 6, true}, {kBuffers + 0x2000, 2042, true}}, 1);
  driver_->notify(kNetReceiveQueue);
  std::vector<uint8_t> first = bytes("first frame from the tap");
  std::vector<uint8_t> second = bytes("second, a bit longer frame from the tap");
  host_send(first, 2 /* DATA_VALID */);
  host_send(second);
  ASSERT_TRUE(VirtioPciTestDriver::wait_used(rx_, 2));
  EXPECT_EQ(rx_.used_element(0), std::make_pair(0u, uint32_t(kNetHeaderSize + first.size())));
  EXPECT_EQ(rx_.used_element(1), std::make_pair(1u, uint32_t(kNetHeaderSize + second.size())));
  std::vector<uint8_t> header = guest_read(kBuffers, kNetHeaderSize);
  EXPECT_EQ(header[0], 2);
  EXPECT_EQ(header[kNetNumBuffersOffset], 1);  // num_buffers = 1
  EXPECT_EQ(header[kNetNumBuffersOffset + 1], 0);
  EXPECT_EQ(guest_read(kBuffers + kNetHeaderSize, first.size()), first);
  std::vector<uint8_t> split = guest_read(kBuffers + 0x1000, 6);
  std::vector<uint8_t> rest = guest_read(kBuffers + 0x2000, kNetHeaderSize - 6 + second.size());
  split.insert(split.end(), rest.begin(), rest.end());
  EXPECT_EQ(split[kNetNumBuffersOffset], 1);
  EXPECT_EQ(std::vector<uint8_t>(split.begin() + kNetHeaderSize, split.end()), second);
  EXPECT_TRUE(driver_->vector(1 + kNetReceiveQueue).wait_triggers(1));
  EXPECT_EQ(net_->metrics().rx_packets, 2u);
}

TEST_F(VirtioNetTest, FramesWaitForBuffersWithoutSpinningAndFlowAfterTheKick) {
  bring_up();
  // No receive buffers yet: the device lets go of the backend instead of spinning on it.
  host_send(bytes("early frame"));
  for (int i = 0; i < 500 && net_->metrics().rx_pauses == 0; ++i) usleep(1000);
  ASSERT_EQ(net_->metrics().rx_pauses, 1u);
  usleep(50000);
  EXPECT_EQ(net_->metrics().rx_pauses, 1u);
  // The driver must be told to kick for the next buffer (EVENT_IDX avail_event).
  EXPECT_EQ(rx_.avail_event(), 0);
  rx_.add_chain({{kBuffers, 2048, true}}, 0);
  driver_->notify(kNetReceiveQueue);
  ASSERT_TRUE(VirtioPciTestDriver::wait_used(rx_, 1));
  EXPECT_EQ(guest_read(kBuffers + kNetHeaderSize, 11), bytes("early frame"));

  // The ring ran dry again, so the driver is asked to kick for its next buffer.
  EXPECT_EQ(rx_.avail_event(), 1);
  rx_.add_chain({{kBuffers + 0x1000, 2048, true}}, 1);
  rx_.add_chain({{kBuffers + 0x2000, 2048, true}}, 2);
  rx_.add_chain({{kBuffers + 0x3000, 2048, true}}, 3);
  driver_->notify(kNetReceiveQueue);
  // While buffers remain, frames flow with no further kick.
  host_send(bytes("frame two"));
  ASSERT_TRUE(VirtioPciTestDriver::wait_used(rx_, 2));
  host_send(bytes("frame three"));
  host_send(bytes("frame four"));
  ASSERT_TRUE(VirtioPciTestDriver::wait_used(rx_, 4));
  EXPECT_EQ(guest_read(kBuffers + 0x2000 + kNetHeaderSize, 11), bytes("frame three"));
  EXPECT_EQ(guest_read(kBuffers + 0x3000 + kNetHeaderSize, 10), bytes("frame four"));

  // Dry once more: a frame waits, and the buffer posted afterwards gets it after the kick.
  usleep(20000);
  uint64_t pauses = net_->metrics().rx_pauses;
  host_send(bytes("frame five"));
  usleep(20000);
  EXPECT_EQ(rx_.used_idx(), 4);
  EXPECT_EQ(net_->metrics().rx_pauses, pauses);
  EXPECT_EQ(rx_.avail_event(), 4);
  rx_.add_chain({{kBuffers + 0x4000, 2048, true}}, 4);
  driver_->notify(kNetReceiveQueue);
  ASSERT_TRUE(VirtioPciTestDriver::wait_used(rx_, 5));
  EXPECT_EQ(guest_read(kBuffers + 0x4000 + kNetHeaderSize, 10), bytes("frame five"));
}

TEST_F(VirtioNetTest, GarbageDescriptorsAreRejectedWithoutCrashing) {
  bring_up();
  // Transmit: too short for a header, and a frame beyond any Ethernet/GSO size.
  tx_.add_chain({{kBuffers, 4, false}}, 0);
  tx_.add_chain({{kBuffers, 70000, false}}, 1);
  driver_->notify(kNetTransmitQueue);
  ASSERT_TRUE(VirtioPciTestDriver::wait_used(tx_, 2));
  EXPECT_EQ(net_->metrics().tx_dropped, 2u);
  EXPECT_TRUE(host_receive(std::chrono::milliseconds(50)).empty());

  // Receive: a buffer with no room for the header, and one that is only device-readable,
  // come back empty; the frame goes into the next good buffer.
  rx_.add_chain({{kBuffers, 8, true}}, 0);
  rx_.add_chain({{kBuffers + 0x1000, 2048, false}}, 1);
  rx_.add_chain({{kBuffers + 0x2000, 2048, true}}, 2);
  driver_->notify(kNetReceiveQueue);
  host_send(bytes("survivor"));
  ASSERT_TRUE(VirtioPciTestDriver::wait_used(rx_, 3));
  EXPECT_EQ(rx_.used_element(0), std::make_pair(0u, 0u));
  EXPECT_EQ(rx_.used_element(1), std::make_pair(1u, 0u));
  EXPECT_EQ(rx_.used_element(2), std::make_pair(2u, uint32_t(kNetHeaderSize + 8)));
  EXPECT_EQ(net_->metrics().rx_bad_buffers, 2u);
  EXPECT_FALSE(driver_->status() & kStatusNeedsReset);

  // A buffer outside guest memory breaks the queue: NEEDS_RESET, not a crash.
  tx_.add_chain({{uint64_t(1) << 40, 64, false}}, 2);
  driver_->notify(kNetTransmitQueue);
  for (int i = 0; i < 500 && !(driver_->status() & kStatusNeedsReset); ++i) usleep(1000);
  EXPECT_TRUE(driver_->status() & kStatusNeedsReset);
  EXPECT_TRUE(host_receive(std::chrono::milliseconds(20)).empty());

  // A driver reset brings it back.
  // (DriverQueue keeps its state in guest memory: a new one at the same place starts over.)
  DriverQueue(m_.memory, 16, kRxDesc, kRxDesc + 0x1000, kRxDesc + 0x2000);
  DriverQueue(m_.memory, 16, kTxDesc, kTxDesc + 0x1000, kTxDesc + 0x2000);
  bring_up();
  EXPECT_FALSE(driver_->status() & kStatusNeedsReset);
  rx_.add_chain({{kBuffers, 2048, true}}, 0);
  driver_->notify(kNetReceiveQueue);
  host_send(bytes("after reset"));
  ASSERT_TRUE(VirtioPciTestDriver::wait_used(rx_, 1));
  EXPECT_EQ(guest_read(kBuffers + kNetHeaderSize, 11), bytes("after reset"));
}

TEST_F(VirtioNetTest, ReceiveOffloadsFollowTheGuestsFeatures) {
  EXPECT_EQ(offloads_, 0xFFFFu);  // untouched until a driver comes up
  bring_up(kFeatureVersion1 | kNetFeatureGuestCsum | kNetFeatureGuestTso4 | kNetFeatureGuestTso6 |
           kNetFeatureHostTso4 | kNetFeatureCsum);
  EXPECT_EQ(offloads_, kTunOffloadCsum | kTunOffloadTso4 | kTunOffloadTso6);
  EXPECT_EQ(net_->backend_offloads(), offloads_.load());
  driver_->set_status(0);
  EXPECT_EQ(offloads_, 0u);
  // Segmentation without checksum offload is meaningless to the tap: nothing is enabled.
  bring_up(kFeatureVersion1 | kNetFeatureGuestTso4);
  EXPECT_EQ(offloads_, 0u);
}

constexpr uint64_t kOffloadingGuest = kFeatureVersion1 | kNetFeatureCtrlVq |
                                      kNetFeatureCtrlGuestOffloads | kNetFeatureGuestCsum |
                                      kNetFeatureGuestTso4 | kNetFeatureGuestTso6;

// What a Linux guest does before it attaches an XDP program: receive offloads off, then on.
TEST_F(VirtioNetTest, GuestOffloadsSetSwitchesTheTapsReceiveOffloads) {
  EXPECT_TRUE(driver_->device_features() & kNetFeatureCtrlVq);
  EXPECT_TRUE(driver_->device_features() & kNetFeatureCtrlGuestOffloads);
  bring_up(kOffloadingGuest);
  EXPECT_EQ(offloads_, kTunOffloadCsum | kTunOffloadTso4 | kTunOffloadTso6);
  EXPECT_EQ(control(kNetCtrlGuestOffloads, kNetCtrlGuestOffloadsSet, le64(0)), kNetCtrlOk);
  EXPECT_EQ(offloads_, 0u);
  EXPECT_EQ(control(kNetCtrlGuestOffloads, kNetCtrlGuestOffloadsSet, le64(kNetFeatureGuestCsum)),
            kNetCtrlOk);
  EXPECT_EQ(offloads_, kTunOffloadCsum);
  EXPECT_EQ(net_->backend_offloads(), kTunOffloadCsum);
  EXPECT_EQ(control(kNetCtrlGuestOffloads, kNetCtrlGuestOffloadsSet,
                    le64(kNetFeatureGuestCsum | kNetFeatureGuestTso4 | kNetFeatureGuestTso6)),
            kNetCtrlOk);
  EXPECT_EQ(offloads_, kTunOffloadCsum | kTunOffloadTso4 | kTunOffloadTso6);
  EXPECT_EQ(net_->metrics().control_commands, 3u);
  EXPECT_EQ(net_->metrics().control_errors, 0u);
  // The device's reset turns them off, and the next driver starts from its own features.
  driver_->set_status(0);
  EXPECT_EQ(offloads_, 0u);
}

// The offloads a command left travel with the device's state; the destination's tap gets them.
TEST_F(VirtioNetTest, SavedStateCarriesTheOffloadsTheDriverSet) {
  EXPECT_EQ(net_->save().guest_offloads, 0u);  // not up: nothing is on
  bring_up(kOffloadingGuest);
  EXPECT_EQ(net_->save().guest_offloads,
            kNetFeatureGuestCsum | kNetFeatureGuestTso4 | kNetFeatureGuestTso6);
  ASSERT_EQ(control(kNetCtrlGuestOffloads, kNetCtrlGuestOffloadsSet, le64(kNetFeatureGuestCsum)),
            kNetCtrlOk);
  const NetState net_state = net_->save();
  EXPECT_EQ(net_state.guest_offloads, kNetFeatureGuestCsum);
  const VirtioPciState state = transport_->save();

  Destination to = destination();
  driver_->set_status(0);
  to.transport->restore(state);
  EXPECT_EQ(*to.offloads, kTunOffloadCsum | kTunOffloadTso4 | kTunOffloadTso6);  // negotiated
  to.net->restore(net_state);
  EXPECT_EQ(*to.offloads, kTunOffloadCsum);
  EXPECT_EQ(to.net->save().guest_offloads, kNetFeatureGuestCsum);
  // Another version, or offloads the driver never negotiated, are refused.
  EXPECT_THROW(to.net->restore({NetState::kVersion + 1, 0}), std::invalid_argument);
  EXPECT_THROW(to.net->restore({NetState::kVersion, kNetFeatureGuestEcn}), std::invalid_argument);
  EXPECT_EQ(*to.offloads, kTunOffloadCsum);
}

TEST_F(VirtioNetTest, BadControlCommandsAreRefusedAndChangeNothing) {
  bring_up(kOffloadingGuest);
  const uint32_t negotiated = offloads_;
  // ECN was not negotiated: the driver may not turn it on.
  EXPECT_EQ(control(kNetCtrlGuestOffloads, kNetCtrlGuestOffloadsSet,
                    le64(kNetFeatureGuestCsum | kNetFeatureGuestEcn)),
            kNetCtrlErr);
  EXPECT_EQ(control(kNetCtrlGuestOffloads, kNetCtrlGuestOffloadsSet, le64(1ull << 40)),
            kNetCtrlErr);
  // Data of the wrong size, a command or class the device does not know, no command at all.
  EXPECT_EQ(control(kNetCtrlGuestOffloads, kNetCtrlGuestOffloadsSet, {0, 0, 0, 0}), kNetCtrlErr);
  EXPECT_EQ(control(kNetCtrlGuestOffloads, kNetCtrlGuestOffloadsSet, std::vector<uint8_t>(9, 0)),
            kNetCtrlErr);
  EXPECT_EQ(control(kNetCtrlGuestOffloads, 1, le64(0)), kNetCtrlErr);
  EXPECT_EQ(control(0 /* VIRTIO_NET_CTRL_RX */, 0, {1}), kNetCtrlErr);
  EXPECT_EQ(control(0xFF, 0xFF, {}), kNetCtrlErr);
  // No room for the ack: the chain comes back with nothing written.
  EXPECT_EQ(control(kNetCtrlGuestOffloads, kNetCtrlGuestOffloadsSet, le64(0), 0), -1);
  EXPECT_EQ(offloads_, negotiated);
  // A tap that refuses: the driver is told, nothing is recorded as on.
  offloads_ = SocketBackend::kRefuseOffloads;
  EXPECT_EQ(control(kNetCtrlGuestOffloads, kNetCtrlGuestOffloadsSet, le64(0)), kNetCtrlErr);
  EXPECT_EQ(net_->backend_offloads(), negotiated);
  EXPECT_EQ(net_->save().guest_offloads,
            kNetFeatureGuestCsum | kNetFeatureGuestTso4 | kNetFeatureGuestTso6);
  offloads_ = negotiated;
  EXPECT_EQ(net_->metrics().control_commands, 0u);
  EXPECT_EQ(net_->metrics().control_errors, 9u);
  EXPECT_FALSE(driver_->status() & kStatusNeedsReset);
  // The queue still works.
  EXPECT_EQ(control(kNetCtrlGuestOffloads, kNetCtrlGuestOffloadsSet, le64(0)), kNetCtrlOk);
  EXPECT_EQ(offloads_, 0u);
}

TEST_F(VirtioNetTest, GuestOffloadsSetNeedsItsFeature) {
  bring_up(kOffloadingGuest & ~kNetFeatureCtrlGuestOffloads);
  EXPECT_EQ(control(kNetCtrlGuestOffloads, kNetCtrlGuestOffloadsSet, le64(0)), kNetCtrlErr);
  EXPECT_EQ(offloads_, kTunOffloadCsum | kTunOffloadTso4 | kTunOffloadTso6);
}

TEST_F(VirtioNetTest, AControlChainOutsideGuestMemoryMeansNeedsReset) {
  bring_up(kOffloadingGuest);
  ctrl_.add_chain({{uint64_t(1) << 40, 10, false}, {kBuffers, 1, true}}, 0);
  driver_->notify(kNetControlQueue);
  for (int i = 0; i < 500 && !(driver_->status() & kStatusNeedsReset); ++i) usleep(1000);
  EXPECT_TRUE(driver_->status() & kStatusNeedsReset);
}

TEST_F(VirtioNetTest, SaveRestoreResumesOnTheSameRingsWithANewBackend) {
  bring_up(kFeatureVersion1 | kFeatureRingEventIdx | kNetFeatureMac | kNetFeatureGuestCsum);
  rx_.add_chain({{kBuffers, 2048, true}}, 0);
  rx_.add_chain({{kBuffers + 0x1000, 2048, true}}, 1);
  driver_->notify(kNetReceiveQueue);
  host_send(bytes("before"));
  ASSERT_TRUE(VirtioPciTestDriver::wait_used(rx_, 1));
  net_->pause();  // no receive pass holds a popped buffer while the rings are saved
  VirtioPciState state = transport_->save();
  EXPECT_EQ(state.queues[kNetReceiveQueue].next_used, 1);

  // The destination opens its own tap (here: another socketpair) and takes over the rings.
  Destination to = destination();
  driver_->set_status(0);  // quiesce the original
  to.transport->restore(state);
  EXPECT_TRUE(to.transport->device_status() & kStatusDriverOk);
  EXPECT_EQ(*to.offloads, kTunOffloadCsum);
  std::vector<uint8_t> packet(kNetHeaderSize, 0);
  for (char c : std::string("after")) packet.push_back(uint8_t(c));
  ASSERT_EQ(::send(to.peer.get(), packet.data(), packet.size(), 0), ssize_t(packet.size()));
  ASSERT_TRUE(VirtioPciTestDriver::wait_used(rx_, 2));
  EXPECT_EQ(rx_.used_element(1), std::make_pair(1u, uint32_t(kNetHeaderSize + 5)));
  EXPECT_EQ(guest_read(kBuffers + 0x1000 + kNetHeaderSize, 5), bytes("after"));
  EXPECT_EQ(to.net->metrics().rx_packets, 1u);
}

// Userspace data path: while paused, frames wait in the tap and kicks change nothing; resume()
// delivers them and sends what the driver queued meanwhile.
TEST_F(VirtioNetTest, PauseStopsBothRingsUntilResume) {
  bring_up(kFeatureVersion1 | kFeatureRingEventIdx | kNetFeatureMac);
  net_->pause();
  rx_.add_chain({{kBuffers, 2048, true}}, 0);
  driver_->notify(kNetReceiveQueue);
  host_send(bytes("held"));
  std::vector<uint8_t> frame(kNetHeaderSize, 0);
  for (char c : std::string("queued")) frame.push_back(uint8_t(c));
  m_.memory.write(kBuffers + 0x4000, frame);
  tx_.add_chain({{kBuffers + 0x4000, uint32_t(frame.size()), false}}, 0);
  driver_->notify(kNetTransmitQueue);
  EXPECT_FALSE(VirtioPciTestDriver::wait_used(rx_, 1, std::chrono::milliseconds(50)));
  EXPECT_EQ(tx_.used_idx(), 0);
  EXPECT_EQ(transport_->save().queues[kNetReceiveQueue].next_avail, 0);

  net_->resume();
  ASSERT_TRUE(VirtioPciTestDriver::wait_used(rx_, 1));
  EXPECT_EQ(guest_read(kBuffers + kNetHeaderSize, 4), bytes("held"));
  EXPECT_EQ(tx_.used_idx(), 1);
  EXPECT_EQ(host_receive(), frame);
}

constexpr uint64_t kMergeFeatures =
    kFeatureVersion1 | kFeatureRingEventIdx | kNetFeatureMac | kNetFeatureMrgRxbuf;

// A frame of `size` bytes whose byte i is uint8_t(i * 7 + seed), to check where pieces land.
std::vector<uint8_t> pattern(size_t size, uint8_t seed = 0) {
  std::vector<uint8_t> frame(size);
  for (size_t i = 0; i < size; ++i) frame[i] = uint8_t(i * 7 + seed);
  return frame;
}

// The frame whose used entries start at `first` and whose buffers are at `gpas`: the header's
// num_buffers and the bytes after the header, gathered by the used lengths.
std::pair<uint16_t, std::vector<uint8_t>> gather(const DriverQueue& rx,
                                                 const memory::GuestMemory& memory, uint16_t first,
                                                 const std::vector<uint64_t>& gpas) {
  std::vector<uint8_t> all;
  for (size_t i = 0; i < gpas.size(); ++i) {
    std::vector<uint8_t> piece(rx.used_element(uint16_t(first + i)).second);
    memory.read(gpas[i], piece);
    all.insert(all.end(), piece.begin(), piece.end());
  }
  if (all.size() < kNetHeaderSize) return {0, {}};
  uint16_t num_buffers = uint16_t(all[kNetNumBuffersOffset] | all[kNetNumBuffersOffset + 1] << 8);
  return {num_buffers, std::vector<uint8_t>(all.begin() + kNetHeaderSize, all.end())};
}

TEST_F(VirtioNetTest, MergedBuffersTakeAFrameOverSeveralChainsWithNumBuffers) {
  bring_up(kMergeFeatures);
  // Sixteen 1 KiB buffers: less than the longest frame, so frames go through the bounce buffer.
  for (uint16_t i = 0; i < 16; ++i) rx_.add_chain({{kBuffers + 0x1000 * i, 1024, true}}, i);
  driver_->notify(kNetReceiveQueue);
  std::vector<uint8_t> big = pattern(3000, 1);
  std::vector<uint8_t> small = bytes("a small one");
  host_send(big);
  host_send(small);
  ASSERT_TRUE(VirtioPciTestDriver::wait_used(rx_, 4));
  EXPECT_EQ(rx_.used_idx(), 4);
  EXPECT_EQ(rx_.used_element(0), std::make_pair(0u, 1024u));
  EXPECT_EQ(rx_.used_element(1), std::make_pair(1u, 1024u));
  EXPECT_EQ(rx_.used_element(2), std::make_pair(2u, uint32_t(kNetHeaderSize + 3000 - 2048)));
  EXPECT_EQ(rx_.used_element(3), std::make_pair(3u, uint32_t(kNetHeaderSize + small.size())));
  auto [count, frame] = gather(rx_, m_.memory, 0, {kBuffers, kBuffers + 0x1000, kBuffers + 0x2000});
  EXPECT_EQ(count, 3);
  EXPECT_EQ(frame, big);
  auto [small_count, small_frame] = gather(rx_, m_.memory, 3, {kBuffers + 0x3000});
  EXPECT_EQ(small_count, 1);
  EXPECT_EQ(small_frame, small);
  EXPECT_EQ(net_->metrics().rx_packets, 2u);
  EXPECT_EQ(net_->metrics().rx_bytes, big.size() + small.size());
}

TEST_F(VirtioNetTest, MergedBuffersHoldingAFullGsoFrameAreWrittenDirectly) {
  bring_up(kMergeFeatures);
  // 16 x 8 KiB: room for the longest frame, so the tap writes straight into guest buffers.
  std::vector<uint64_t> gpas;
  for (uint16_t i = 0; i < 16; ++i) {
    gpas.push_back(kBuffers + 0x2000 * i);
    rx_.add_chain({{gpas.back(), 8192, true}}, i);
  }
  driver_->notify(kNetReceiveQueue);
  std::vector<uint8_t> gso = pattern(65000, 3);
  host_send(gso);
  uint16_t pieces = uint16_t((kNetHeaderSize + gso.size() + 8191) / 8192);  // 8
  ASSERT_TRUE(VirtioPciTestDriver::wait_used(rx_, pieces));
  EXPECT_EQ(rx_.used_idx(), pieces);
  for (uint16_t i = 0; i + 1 < pieces; ++i)
    EXPECT_EQ(rx_.used_element(i), std::make_pair(uint32_t(i), 8192u));
  auto [count, frame] =
      gather(rx_, m_.memory, 0, std::vector<uint64_t>(gpas.begin(), gpas.begin() + pieces));
  EXPECT_EQ(count, pieces);
  EXPECT_EQ(frame, gso);
  // The chains it did not need take the next frame.
  host_send(bytes("next"));
  ASSERT_TRUE(VirtioPciTestDriver::wait_used(rx_, uint16_t(pieces + 1)));
  EXPECT_EQ(rx_.used_element(pieces), std::make_pair(uint32_t(pieces), kNetHeaderSize + 4));
  EXPECT_EQ(gather(rx_, m_.memory, pieces, {gpas[pieces]}).second, bytes("next"));
}

TEST_F(VirtioNetTest, MergedFrameWaitsForEnoughBuffersAndIsDroppedOnlyIfTheRingCannotHoldIt) {
  bring_up(kMergeFeatures);
  rx_.add_chain({{kBuffers, 1024, true}}, 0);
  rx_.add_chain({{kBuffers + 0x1000, 1024, true}}, 1);
  driver_->notify(kNetReceiveQueue);
  std::vector<uint8_t> frame = pattern(3000, 5);
  host_send(frame);
  // Two buffers are too few: the frame waits, nothing is half-delivered.
  for (int i = 0; i < 500 && net_->metrics().rx_pauses == 0; ++i) usleep(1000);
  EXPECT_GE(net_->metrics().rx_pauses, 1u);
  usleep(20000);
  EXPECT_EQ(rx_.used_idx(), 0);
  EXPECT_EQ(rx_.avail_event(), 2);  // and the driver is asked to kick for more
  rx_.add_chain({{kBuffers + 0x2000, 1024, true}}, 2);
  driver_->notify(kNetReceiveQueue);
  ASSERT_TRUE(VirtioPciTestDriver::wait_used(rx_, 3));
  auto [count, got] = gather(rx_, m_.memory, 0, {kBuffers, kBuffers + 0x1000, kBuffers + 0x2000});
  EXPECT_EQ(count, 3);
  EXPECT_EQ(got, frame);
  EXPECT_EQ(net_->metrics().rx_dropped, 0u);

  // The whole ring (16 x 1 KiB) cannot take 20000 bytes: that frame is dropped and counted,
  // and the one behind it lands in the first buffer.
  for (uint16_t i = 0; i < 16; ++i) {
    uint16_t slot = uint16_t((3 + i) % 16);
    rx_.add_chain({{kBuffers + 0x1000 * slot, 1024, true}}, slot);
  }
  driver_->notify(kNetReceiveQueue);
  host_send(pattern(20000));
  host_send(bytes("after the drop"));
  ASSERT_TRUE(VirtioPciTestDriver::wait_used(rx_, 4));
  EXPECT_EQ(net_->metrics().rx_dropped, 1u);
  EXPECT_EQ(rx_.used_element(3), std::make_pair(3u, uint32_t(kNetHeaderSize + 14)));
  EXPECT_EQ(gather(rx_, m_.memory, 3, {kBuffers + 0x3000}).second, bytes("after the drop"));
  EXPECT_FALSE(driver_->status() & kStatusNeedsReset);
}

TEST_F(VirtioNetTest, MergedBuffersThatCannotHoldAHeaderComeBackEmptyBeforeTheFrame) {
  bring_up(kMergeFeatures);
  rx_.add_chain({{kBuffers, 1024, true}}, 0);
  rx_.add_chain({{kBuffers + 0x1000, 0, true}}, 1);     // empty
  rx_.add_chain({{kBuffers + 0x2000, 8, true}}, 2);     // shorter than the header
  rx_.add_chain({{kBuffers + 0x3000, 512, false}}, 3);  // device-readable only
  rx_.add_chain({{kBuffers + 0x4000, 0, true}, {kBuffers + 0x4100, 0, true}}, 4);
  rx_.add_chain({{kBuffers + 0x5000, 1024, true}}, 6);
  driver_->notify(kNetReceiveQueue);
  std::vector<uint8_t> frame = pattern(1500, 9);
  host_send(frame);
  ASSERT_TRUE(VirtioPciTestDriver::wait_used(rx_, 6));
  // The four unusable chains first, then the frame's two, whose count says 2.
  for (uint16_t i = 0; i < 4; ++i) EXPECT_EQ(rx_.used_element(i).second, 0u);
  EXPECT_EQ(rx_.used_element(4), std::make_pair(0u, 1024u));
  EXPECT_EQ(rx_.used_element(5), std::make_pair(6u, uint32_t(kNetHeaderSize + 1500 - 1024)));
  auto [count, got] = gather(rx_, m_.memory, 4, {kBuffers, kBuffers + 0x5000});
  EXPECT_EQ(count, 2);
  EXPECT_EQ(got, frame);
  EXPECT_EQ(net_->metrics().rx_bad_buffers, 4u);
  EXPECT_FALSE(driver_->status() & kStatusNeedsReset);
}

TEST_F(VirtioNetTest, WithoutMergedBuffersAFrameStaysInOneChain) {
  EXPECT_TRUE(driver_->device_features() & kNetFeatureMrgRxbuf);
  bring_up();  // MRG_RXBUF not accepted
  rx_.add_chain({{kBuffers, 1024, true}}, 0);
  rx_.add_chain({{kBuffers + 0x1000, 1024, true}}, 1);
  driver_->notify(kNetReceiveQueue);
  host_send(pattern(3000));
  host_send(bytes("second"));
  ASSERT_TRUE(VirtioPciTestDriver::wait_used(rx_, 2));
  // The first chain gets what fits of the first frame (the socket cuts it like a tap) and
  // num_buffers 1; the second frame gets a chain of its own.
  EXPECT_EQ(rx_.used_element(0), std::make_pair(0u, 1024u));
  EXPECT_EQ(guest_read(kBuffers + kNetNumBuffersOffset, 2), std::vector<uint8_t>({1, 0}));
  EXPECT_EQ(rx_.used_element(1), std::make_pair(1u, uint32_t(kNetHeaderSize + 6)));
  EXPECT_EQ(guest_read(kBuffers + 0x1000 + kNetHeaderSize, 6), bytes("second"));
}

// Stands in for vhost-net: records what the device hands over and returns configured ring
// positions on stop.
struct FakeKernelState {
  std::mutex mutex;
  uint64_t features = kFeatureVersion1 | kFeatureRingEventIdx | kNetFeatureMrgRxbuf |
                      (1ull << 27) /* VHOST_NET_F_VIRTIO_NET_HDR */ |
                      (1ull << 26) /* VHOST_F_LOG_ALL */;
  bool fail_start = false;
  int starts = 0, stops = 0;
  NetKernelStart last;
  std::vector<uint16_t> stop_positions = {0, 0};
};

class FakeKernel : public NetKernelDatapath {
 public:
  // Shared: the device outlives the test's own members (the bus that holds it is in the base
  // fixture) and stops the kernel data path when it is destroyed.
  explicit FakeKernel(std::shared_ptr<FakeKernelState> state) : state_(std::move(state)) {}
  uint64_t features() const override { return s_.features; }
  void start(const NetKernelStart& start) override {
    std::lock_guard lock(s_.mutex);
    if (s_.fail_start) throw std::runtime_error("VHOST_NET_SET_BACKEND: no");
    s_.starts++;
    s_.last = start;
  }
  std::vector<uint16_t> stop() override {
    std::lock_guard lock(s_.mutex);
    s_.stops++;
    return s_.stop_positions;
  }

 private:
  std::shared_ptr<FakeKernelState> state_;
  FakeKernelState& s_ = *state_;
};

uint64_t eventfd_count(int fd) {
  uint64_t value = 0;
  return ::read(fd, &value, sizeof(value)) == sizeof(value) ? value : 0;
}

class VirtioNetKernelTest : public VirtioNetTest {
 protected:
  void SetUp() override {
    int pair[2];
    ASSERT_EQ(socketpair(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, pair), 0);
    peer_.reset(pair[1]);
    tap_fd_ = pair[0];
    net_ = std::make_shared<VirtioNet>(std::make_unique<SocketBackend>(pair[0], offloads_),
                                       MacAddress{0x52, 0x54, 0x00, 0x12, 0x34, 0x56}, m_.loop,
                                       std::make_unique<FakeKernel>(kernel_));
    transport_ = std::make_shared<VirtioPciDevice>(net_, m_.memory, m_.msi, m_.loop);
    driver_ = std::make_unique<VirtioPciTestDriver>(m_, m_.root.add(transport_));
    driver_->probe();
  }
  NetKernelStart last_start() {
    std::lock_guard lock(kernel_->mutex);
    return kernel_->last;
  }

  std::shared_ptr<FakeKernelState> kernel_ = std::make_shared<FakeKernelState>();
  int tap_fd_ = -1;
};

TEST_F(VirtioNetKernelTest, FeaturesAreWhatBothTheDeviceAndTheKernelCanDo) {
  uint64_t offered = net_->device_features();
  EXPECT_TRUE(net_->uses_kernel_datapath());
  // Ring features follow the kernel: no indirect descriptors here, mergeable buffers added.
  EXPECT_TRUE(offered & kFeatureVersion1);
  EXPECT_TRUE(offered & kFeatureRingEventIdx);
  EXPECT_TRUE(offered & kNetFeatureMrgRxbuf);
  EXPECT_FALSE(offered & kFeatureRingIndirectDesc);
  // vhost's own bits are never offered to the guest; virtio-net's device bits always are.
  EXPECT_FALSE(offered & (1ull << 27));
  EXPECT_FALSE(offered & (1ull << 26));
  EXPECT_TRUE(offered & kNetFeatureMac);
  EXPECT_TRUE(offered & kNetFeatureGuestTso4);
  // The userspace data path merges receive buffers too, whatever the kernel can do.
  int pair[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, pair), 0);
  UniqueFd peer(pair[1]);
  std::atomic<uint32_t> offloads{0};
  VirtioNet userspace(std::make_unique<SocketBackend>(pair[0], offloads), net_->mac(), m_.loop);
  EXPECT_TRUE(userspace.device_features() & kNetFeatureMrgRxbuf);
  EXPECT_TRUE(userspace.device_features() & kFeatureRingIndirectDesc);
}

// Commands run on the event loop while the kernel moves the frames (the control queue is not
// handed to it), and resets with a command just kicked stop and restart the kernel cleanly.
TEST_F(VirtioNetKernelTest, ControlCommandsRunBesideTheKernelDataPath) {
  bring_up(kOffloadingGuest);
  ASSERT_EQ(kernel_->starts, 1);
  EXPECT_FALSE(net_->handles_notifications(kNetControlQueue));
  EXPECT_EQ(control(kNetCtrlGuestOffloads, kNetCtrlGuestOffloadsSet, le64(kNetFeatureGuestCsum)),
            kNetCtrlOk);
  EXPECT_EQ(offloads_, kTunOffloadCsum);
  EXPECT_EQ(last_start().rings.size(), 2u);  // the control queue stays with the device
  for (int i = 0; i < 20; ++i) {
    ctrl_.add_chain({{kBuffers, 2, false}, {kBuffers + 0x100, 1, true}}, uint16_t(i % 16));
    driver_->notify(kNetControlQueue);
    driver_->set_status(0);
    DriverQueue(m_.memory, 16, kRxDesc, kRxDesc + 0x1000, kRxDesc + 0x2000);
    DriverQueue(m_.memory, 16, kTxDesc, kTxDesc + 0x1000, kTxDesc + 0x2000);
    DriverQueue(m_.memory, 16, kCtrlDesc, kCtrlDesc + 0x1000, kCtrlDesc + 0x2000);
    bring_up(kOffloadingGuest);
  }
  EXPECT_EQ(kernel_->starts, 21);
  EXPECT_EQ(kernel_->stops, 20);
}

TEST_F(VirtioNetKernelTest, AKernelWithoutVersion1IsRefused) {
  auto old = std::make_shared<FakeKernelState>();
  old->features = kFeatureRingEventIdx | kNetFeatureMrgRxbuf;
  int pair[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, pair), 0);
  UniqueFd peer(pair[1]);
  std::atomic<uint32_t> offloads{0};
  EXPECT_THROW(VirtioNet(std::make_unique<SocketBackend>(pair[0], offloads), net_->mac(), m_.loop,
                         std::make_unique<FakeKernel>(old)),
               std::invalid_argument);
}

TEST_F(VirtioNetKernelTest, DriverOkHandsTheRingsAndTheTapToTheKernel) {
  bring_up(kFeatureVersion1 | kFeatureRingEventIdx | kNetFeatureMrgRxbuf | kNetFeatureMac |
           kNetFeatureCsum | kNetFeatureGuestCsum | kNetFeatureGuestTso4);
  EXPECT_FALSE(driver_->status() & kStatusNeedsReset);
  NetKernelStart s = last_start();
  EXPECT_EQ(kernel_->starts, 1);
  EXPECT_EQ(net_->metrics().kernel_starts, 1u);
  // Only ring features reach the kernel; the offloads go to the tap.
  EXPECT_EQ(s.features, kFeatureVersion1 | kFeatureRingEventIdx | kNetFeatureMrgRxbuf);
  EXPECT_EQ(offloads_, kTunOffloadCsum | kTunOffloadTso4);
  EXPECT_EQ(s.tap_fd, tap_fd_);
  EXPECT_EQ(s.memory, &m_.memory);
  ASSERT_EQ(s.rings.size(), 2u);
  EXPECT_EQ(s.rings[0].index, kNetReceiveQueue);
  EXPECT_EQ(s.rings[1].index, kNetTransmitQueue);
  EXPECT_EQ(s.rings[0].size, 16);
  EXPECT_EQ(s.rings[0].desc_host, reinterpret_cast<uint64_t>(m_.memory.slice(kRxDesc, 1)->data()));
  EXPECT_EQ(s.rings[1].avail_host,
            reinterpret_cast<uint64_t>(m_.memory.slice(kTxDesc + 0x1000, 1)->data()));
  EXPECT_EQ(s.rings[1].used_host,
            reinterpret_cast<uint64_t>(m_.memory.slice(kTxDesc + 0x2000, 1)->data()));
  EXPECT_NE(s.rings[0].kick_fd, s.rings[1].kick_fd);
  EXPECT_NE(s.rings[0].call_fd, s.rings[1].call_fd);

  // The tap belongs to the kernel now: a frame waiting there is not read by kiln.
  rx_.add_chain({{kBuffers, 2048, true}}, 0);
  driver_->notify(kNetReceiveQueue);
  host_send(bytes("for the kernel"));
  usleep(50000);
  EXPECT_EQ(rx_.used_idx(), 0);
  EXPECT_EQ(net_->metrics().rx_packets, 0u);
  EXPECT_EQ(net_->metrics().rx_wakeups, 0u);
}

TEST_F(VirtioNetKernelTest, NotificationsAndInterruptsAreRelayed) {
  bring_up(kFeatureVersion1 | kFeatureRingEventIdx | kNetFeatureMrgRxbuf);
  NetKernelStart s = last_start();
  const KernelRing& rx = s.rings[0];
  const KernelRing& tx = s.rings[1];
  // The kernel waits on the transport's notification eventfds themselves (KVM ioeventfds in
  // kiln): a guest kick reaches it without waking kiln.
  EXPECT_EQ(rx.kick_fd, transport_->queue_eventfd(kNetReceiveQueue));
  EXPECT_EQ(tx.kick_fd, transport_->queue_eventfd(kNetTransmitQueue));
  EXPECT_EQ(net_->metrics().kernel_direct_kicks, 2u);
  EXPECT_GE(eventfd_count(tx.kick_fd), 1u);  // the kick given at start
  driver_->notify(kNetTransmitQueue);
  uint64_t kicked = 0;
  for (int i = 0; i < 500 && !kicked; ++i, usleep(1000)) kicked = eventfd_count(tx.kick_fd);
  EXPECT_GE(kicked, 1u);
  usleep(20000);
  EXPECT_EQ(net_->metrics().tx_kicks, 0u);  // the loop did not take it
  // Without an irqfd for the vector (FakeMsiVector has none by default), kiln relays.
  EXPECT_EQ(net_->metrics().kernel_direct_calls, 0u);
  int before = driver_->vector(1 + kNetReceiveQueue).triggers;
  uint64_t one = 1;
  ASSERT_EQ(::write(rx.call_fd, &one, sizeof(one)), 8);  // the kernel used receive buffers
  EXPECT_TRUE(driver_->vector(1 + kNetReceiveQueue).wait_triggers(before + 1));
  EXPECT_EQ(net_->metrics().rx_interrupts, 1u);
}

TEST_F(VirtioNetKernelTest, InterruptsGoStraightToTheVectorsIrqfdWhenItHasOne) {
  UniqueFd rx_irqfd(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)), tx_irqfd(eventfd(0, EFD_CLOEXEC));
  // Vector 0 is the config vector; the test driver gives queue q vector 1 + q.
  m_.msi.vectors.at(1 + kNetReceiveQueue)->direct_fd = rx_irqfd.get();
  m_.msi.vectors.at(1 + kNetTransmitQueue)->direct_fd = tx_irqfd.get();
  bring_up(kFeatureVersion1 | kFeatureRingEventIdx);
  NetKernelStart s = last_start();
  EXPECT_EQ(s.rings[0].call_fd, rx_irqfd.get());
  EXPECT_EQ(s.rings[1].call_fd, tx_irqfd.get());
  EXPECT_EQ(net_->metrics().kernel_direct_calls, 2u);
  // A vector the driver masks keeps its irqfd: the vector itself holds the kernel's signals
  // back while masked (MsiVector::configure), so the data path stays in the kernel.
  driver_->set_status(0);
  driver_->mask_vector(1 + kNetTransmitQueue, true);
  bring_up(kFeatureVersion1 | kFeatureRingEventIdx);
  s = last_start();
  EXPECT_EQ(s.rings[0].call_fd, rx_irqfd.get());
  EXPECT_EQ(s.rings[1].call_fd, tx_irqfd.get());
  EXPECT_TRUE(m_.msi.vectors.at(1 + kNetTransmitQueue)->masked);
}

TEST_F(VirtioNetKernelTest, PauseWritesTheKernelsPositionsIntoTheQueuesAndResumeContinues) {
  bring_up(kFeatureVersion1 | kFeatureRingEventIdx | kNetFeatureMrgRxbuf);
  // The kernel took 3 receive and 5 transmit buffers and used them all.
  kernel_->stop_positions = {3, 5};
  ASSERT_TRUE(m_.memory.write_obj(kRxDesc + 0x2000 + 2, uint16_t(3)));  // used->idx
  ASSERT_TRUE(m_.memory.write_obj(kTxDesc + 0x2000 + 2, uint16_t(5)));
  net_->pause();
  EXPECT_EQ(kernel_->stops, 1);
  VirtioPciState state = transport_->save();
  EXPECT_EQ(state.queues[kNetReceiveQueue].next_avail, 3);
  EXPECT_EQ(state.queues[kNetReceiveQueue].next_used, 3);
  EXPECT_EQ(state.queues[kNetTransmitQueue].next_avail, 5);
  EXPECT_EQ(state.queues[kNetTransmitQueue].next_used, 5);
  net_->pause();  // idempotent
  EXPECT_EQ(kernel_->stops, 1);
  net_->resume();
  NetKernelStart s = last_start();
  EXPECT_EQ(kernel_->starts, 2);
  EXPECT_EQ(s.rings[0].next_avail, 3);
  EXPECT_EQ(s.rings[1].next_avail, 5);
}

TEST_F(VirtioNetKernelTest, ResetStopsTheKernelAndAReturningDriverStartsAfresh) {
  bring_up(kFeatureVersion1 | kFeatureRingEventIdx | kNetFeatureMrgRxbuf | kNetFeatureGuestCsum);
  driver_->set_status(0);  // guest reboot
  EXPECT_EQ(kernel_->stops, 1);
  EXPECT_EQ(offloads_, 0u);
  bring_up(kFeatureVersion1);
  EXPECT_EQ(kernel_->starts, 2);
  NetKernelStart s = last_start();
  EXPECT_EQ(s.features, kFeatureVersion1);
  EXPECT_EQ(s.rings[0].next_avail, 0);
}

TEST_F(VirtioNetKernelTest, AKernelThatCannotStartMeansNeedsReset) {
  kernel_->fail_start = true;
  ASSERT_TRUE(driver_->negotiate(kFeatureVersion1));
  driver_->setup_queue(kNetReceiveQueue, rx_);
  driver_->setup_queue(kNetTransmitQueue, tx_);
  driver_->driver_ok();
  EXPECT_TRUE(driver_->status() & kStatusNeedsReset);
  EXPECT_EQ(net_->metrics().kernel_starts, 0u);
}

TEST(TapTest, BadNamesAndMissingDevicesAreClearErrors) {
  EXPECT_THROW(Tap::open("a-name-longer-than-ifnamsiz"), TapError);
  EXPECT_THROW(Tap::open(""), TapError);
  try {
    Tap::open("tap0", "/nonexistent/tun");
    FAIL() << "opened a tap through a missing device";
  } catch (const TapError& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent/tun"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace kiln::devices::virtio
