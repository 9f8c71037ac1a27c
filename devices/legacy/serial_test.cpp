#include "devices/legacy/serial.h"

#include <gtest/gtest.h>

#include <string>
#include <thread>
#include <vector>

#include "devices/legacy/fake_irq_for_test.h"

namespace kiln::devices::legacy {
namespace {

constexpr uint64_t kBase = Serial::kCom1Base;
constexpr uint64_t kThr = kBase + 0, kIer = kBase + 1, kIir = kBase + 2, kFcr = kBase + 2,
                   kLcr = kBase + 3, kMcr = kBase + 4, kLsr = kBase + 5, kMsr = kBase + 6,
                   kScr = kBase + 7;

class SerialTest : public ::testing::Test {
 protected:
  SerialTest() { bus.insert(serial, kBase, Serial::kLength); }

  void out(uint64_t port, uint8_t value) {
    uint8_t data[1] = {value};
    ASSERT_TRUE(bus.write(port, data));
  }
  uint8_t in(uint64_t port) {
    uint8_t data[1] = {0};
    EXPECT_TRUE(bus.read(port, data));
    return data[0];
  }
  bool enqueue(const std::string& text) {
    return serial->enqueue_input(
        std::span(reinterpret_cast<const uint8_t*>(text.data()), text.size()));
  }
  std::string drain_receiver() {
    std::string text;
    while (in(kLsr)&0x01) text.push_back(char(in(kThr)));
    return text;
  }

  std::shared_ptr<FakeIrq> irq = std::make_shared<FakeIrq>();
  std::string output;
  std::shared_ptr<Serial> serial = std::make_shared<Serial>(
      irq, [this](std::span<const uint8_t> bytes) { output.append(bytes.begin(), bytes.end()); },
      /*backlog_capacity=*/256);
  Bus bus;
};

TEST_F(SerialTest, ResetValues) {
  EXPECT_EQ(in(kIer), 0x00);
  EXPECT_EQ(in(kIir), 0x01);  // no interrupt pending, FIFOs off
  EXPECT_EQ(in(kLcr), 0x00);
  EXPECT_EQ(in(kMcr), 0x00);
  EXPECT_EQ(in(kLsr), 0x60);  // THR and transmitter empty
  EXPECT_EQ(in(kMsr), 0xb0);  // CTS, DSR, DCD asserted, no deltas
}

TEST_F(SerialTest, DlabMapsOffsetsZeroAndOneToTheDivisorLatch) {
  out(kIer, 0x05);
  out(kLcr, 0x83);
  out(kThr, 0x0c);  // DLL, not a transmission
  out(kIer, 0x01);  // DLM
  EXPECT_EQ(in(kThr), 0x0c);
  EXPECT_EQ(in(kIer), 0x01);
  EXPECT_TRUE(output.empty());
  out(kLcr, 0x03);
  EXPECT_EQ(in(kIer), 0x05);  // IER kept its own value
  EXPECT_EQ(serial->save().divisor, 0x010c);
  out(kThr, 'x');
  EXPECT_EQ(output, "x");
}

TEST_F(SerialTest, IerKeepsOnlyItsFourBitsAndScratchKeepsAll) {
  out(kIer, 0xff);
  EXPECT_EQ(in(kIer), 0x0f);
  out(kScr, 0xa5);
  EXPECT_EQ(in(kScr), 0xa5);
  out(kMcr, 0xff);
  EXPECT_EQ(in(kMcr), 0x1f);
}

TEST_F(SerialTest, TransmittedBytesReachTheOutput) {
  for (char c : std::string("hello")) out(kThr, uint8_t(c));
  EXPECT_EQ(output, "hello");
  EXPECT_EQ(in(kLsr)&0x60, 0x60);
}

TEST_F(SerialTest, FifoHoldsSixteenBytesAndOverrunLosesTheSeventeenth) {
  out(kFcr, 0x07);  // enable and clear FIFOs
  EXPECT_EQ(in(kIir), 0xc1);
  out(kMcr, 0x10);  // loopback: transmitted bytes come back to the receiver
  for (int i = 0; i < 17; ++i) out(kThr, uint8_t('a' + i));
  EXPECT_TRUE(output.empty());
  uint8_t lsr = in(kLsr);
  EXPECT_EQ(lsr & 0x03, 0x03);  // data ready and overrun
  EXPECT_EQ(in(kLsr)&0x02, 0);  // reading LSR cleared the overrun
  EXPECT_EQ(drain_receiver(), "abcdefghijklmnop");
}

TEST_F(SerialTest, WithoutFifoOverrunOverwritesTheHoldingRegister) {
  out(kMcr, 0x10);
  out(kThr, 'a');
  out(kThr, 'b');
  EXPECT_EQ(in(kLsr)&0x03, 0x03);
  EXPECT_EQ(drain_receiver(), "b");
}

TEST_F(SerialTest, FcrClearsTheReceiveFifo) {
  out(kFcr, 0x01);
  out(kMcr, 0x10);
  out(kThr, 'a');
  out(kFcr, 0x03);
  EXPECT_EQ(in(kLsr)&0x01, 0);
}

TEST_F(SerialTest, HostInputBeyondTheFifoWaitsInTheBacklog) {
  out(kFcr, 0x01);
  std::string paste;
  for (int i = 0; i < 200; ++i) paste.push_back(char('0' + i % 64));
  EXPECT_TRUE(enqueue(paste));
  EXPECT_FALSE(enqueue(std::string(100, 'x')));  // 200 + 100 > 256: nothing taken
  EXPECT_EQ(serial->save().rx_count, 16);
  EXPECT_EQ(drain_receiver(), paste);
  EXPECT_EQ(in(kLsr)&0x02, 0);  // never an overrun
  EXPECT_TRUE(enqueue(std::string(256, 'y')));
}

TEST_F(SerialTest, RxDataInterruptHonoursTheTriggerLevelElseReportsTimeout) {
  out(kIer, 0x01);
  out(kFcr, 0xc1);  // trigger level 14
  EXPECT_TRUE(enqueue("abc"));
  EXPECT_EQ(in(kIir), 0xcc);  // character timeout
  EXPECT_TRUE(enqueue("defghijklmn"));
  EXPECT_EQ(in(kIir), 0xc4);  // 14 bytes: received data available
  in(kThr);
  EXPECT_EQ(in(kIir), 0xcc);
  drain_receiver();
  EXPECT_EQ(in(kIir), 0xc1);
}

TEST_F(SerialTest, InterruptIdentificationFollowsPriorities) {
  out(kFcr, 0x01);
  out(kMcr, 0x10);  // loopback, to produce an overrun and modem status changes
  in(kMsr);         // entering loopback changed every line: clear those deltas
  for (int i = 0; i < 17; ++i) out(kThr, 'z');
  out(kMcr, 0x12);  // RTS -> CTS changes: modem status delta
  out(kIer, 0x0f);
  EXPECT_EQ(in(kIir), 0xc6);  // line status (overrun) first
  in(kLsr);
  EXPECT_EQ(in(kIir), 0xc4);  // then received data
  drain_receiver();
  EXPECT_EQ(in(kIir), 0xc2);  // then THR empty, acknowledged by this read
  EXPECT_EQ(in(kIir), 0xc0);  // then modem status
  EXPECT_EQ(in(kMsr)&0x0f, 0x01);
  EXPECT_EQ(in(kIir), 0xc1);
}

TEST_F(SerialTest, EnablingThreInterruptWhileThrEmptyRaisesItAgain) {
  out(kMcr, 0x08);  // OUT2
  out(kIer, 0x02);
  EXPECT_TRUE(irq->level);
  EXPECT_EQ(in(kIir), 0x02);
  EXPECT_FALSE(irq->level);
  EXPECT_EQ(in(kIir), 0x01);
  out(kIer, 0x02);  // still enabled: no new edge
  EXPECT_EQ(in(kIir), 0x01);
  out(kIer, 0x00);
  out(kIer, 0x02);
  EXPECT_TRUE(irq->level);
  EXPECT_EQ(in(kIir), 0x02);
  out(kThr, 'a');  // the byte leaves at once, THR is empty again
  EXPECT_TRUE(irq->level);
  out(kIer, 0x00);  // how Linux stops the transmit loop
  EXPECT_FALSE(irq->level);
}

TEST_F(SerialTest, IrqLevelNeedsOut2) {
  out(kIer, 0x01);
  EXPECT_TRUE(enqueue("a"));
  EXPECT_FALSE(irq->level);
  out(kMcr, 0x08);
  EXPECT_TRUE(irq->level);
  out(kMcr, 0x00);
  EXPECT_FALSE(irq->level);
  out(kMcr, 0x08);
  EXPECT_TRUE(irq->level);
  in(kThr);
  EXPECT_FALSE(irq->level);
  EXPECT_EQ(irq->changes, (std::vector<bool>{true, false, true, false}));
}

TEST_F(SerialTest, LoopbackWiresOutputsToModemInputsAndKeepsTheIrqOff) {
  out(kMcr, 0x1a);  // loop, OUT2, RTS: Linux's UART presence test expects CTS and DCD
  EXPECT_EQ(in(kMsr)&0xf0, 0x90);
  out(kMcr, 0x15);                   // loop, OUT1, DTR
  EXPECT_EQ(in(kMsr), 0x60 | 0x0b);  // DSR, RI; CTS, DSR and DCD changed
  out(kMcr, 0x18);
  EXPECT_EQ(in(kMsr)&0x04, 0x04);  // RI trailing edge
  out(kIer, 0x01);
  out(kThr, 'q');
  EXPECT_TRUE(output.empty());
  EXPECT_FALSE(irq->level);  // OUT pins are inactive in loopback
  EXPECT_TRUE(enqueue("host"));
  EXPECT_EQ(drain_receiver(), "q");  // the receive pin is disconnected in loopback
  out(kMcr, 0x08);
  EXPECT_EQ(drain_receiver(), "host");
}

TEST_F(SerialTest, SaveRestoreRoundTrip) {
  out(kLcr, 0x80);
  out(kThr, 0x01);
  out(kLcr, 0x03);
  out(kFcr, 0x81);
  out(kIer, 0x01);
  out(kMcr, 0x0b);
  out(kScr, 0x5a);
  EXPECT_TRUE(enqueue(std::string(40, 'k')));
  in(kThr);
  Serial::State saved = serial->save();

  auto irq2 = std::make_shared<FakeIrq>();
  auto copy = std::make_shared<Serial>(irq2, nullptr, 256);
  copy->restore(saved);
  EXPECT_TRUE(irq2->level);  // restore re-drives the line
  Bus bus2;
  bus2.insert(copy, kBase, Serial::kLength);
  for (uint64_t port : {kIer, kIir, kLcr, kMcr, kScr, kMsr}) {
    uint8_t a[1], b[1];
    bus.read(port, a);
    bus2.read(port, b);
    EXPECT_EQ(a[0], b[0]) << "port " << port;
  }
  std::string rest;
  uint8_t byte[1];
  for (int i = 0; i < 39; ++i) {
    bus2.read(kThr, byte);
    rest.push_back(char(byte[0]));
  }
  EXPECT_EQ(rest, std::string(39, 'k'));
  bus2.read(kLsr, byte);
  EXPECT_EQ(byte[0] & 0x01, 0);
}

TEST_F(SerialTest, RestoreRejectsBadStates) {
  Serial::State state;
  state.version = 99;
  EXPECT_THROW(serial->restore(state), std::invalid_argument);
  state = {};
  state.rx_count = 17;
  EXPECT_THROW(serial->restore(state), std::invalid_argument);
  state = {};
  state.rx_count = 2;  // FIFOs disabled hold one byte
  EXPECT_THROW(serial->restore(state), std::invalid_argument);
  state = {};
  state.backlog.resize(257);
  EXPECT_THROW(serial->restore(state), std::invalid_argument);
}

TEST_F(SerialTest, HostThreadInputAndVcpuReadsInterleaveWithoutLoss) {
  auto big = std::make_shared<Serial>(nullptr, nullptr, 1024);
  Bus big_bus;
  big_bus.insert(big, kBase, Serial::kLength);
  uint8_t fcr[1] = {0x01};
  big_bus.write(kFcr, fcr);
  constexpr int kBytes = 20000;
  std::thread host([&] {
    for (int i = 0; i < kBytes;) {
      uint8_t byte[1] = {uint8_t(i)};
      if (big->enqueue_input(byte)) {
        ++i;
      } else {
        std::this_thread::yield();
      }
    }
  });
  int received = 0;
  bool in_order = true;
  while (received < kBytes) {
    uint8_t lsr[1], data[1];
    big_bus.read(kLsr, lsr);
    if (!(lsr[0] & 0x01)) continue;
    big_bus.read(kThr, data);
    in_order &= data[0] == uint8_t(received);
    ++received;
  }
  host.join();
  EXPECT_TRUE(in_order);
}

}  // namespace
}  // namespace kiln::devices::legacy
