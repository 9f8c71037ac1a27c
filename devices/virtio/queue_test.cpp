#include "devices/virtio/queue.h"

#include <gtest/gtest.h>

#include "devices/virtio/test_support.h"

namespace kiln::devices::virtio {
namespace {

using testing::DriverQueue;

constexpr uint16_t kSize = 8;
constexpr uint64_t kRam = 1 << 20;

class QueueTest : public ::testing::Test {
 protected:
  QueueTest()
      : memory_(memory::GuestMemory::create_ram(kRam)),
        driver_(memory_, kSize, 0x1000, 0x2000, 0x3000),
        queue_(kSize) {
    queue_.set_desc_table(driver_.desc());
    queue_.set_avail_ring(driver_.avail());
    queue_.set_used_ring(driver_.used());
    queue_.set_ready(true);
  }

  void activate(bool indirect = true, bool event_idx = false) {
    queue_.set_features(indirect, event_idx);
    ASSERT_EQ(queue_.activate(memory_), std::nullopt);
  }

  // Pops one chain and expects the walker to reject it with a message containing `what`.
  void expect_rejected(const std::string& what) {
    DescriptorChain chain;
    EXPECT_EQ(queue_.pop(memory_, chain), Queue::PopStatus::kError);
    EXPECT_TRUE(queue_.broken());
    EXPECT_NE(queue_.error().find(what), std::string::npos) << queue_.error();
    // A broken queue stays broken and never hands out work or writes the used ring.
    EXPECT_EQ(queue_.pop(memory_, chain), Queue::PopStatus::kError);
    EXPECT_FALSE(queue_.add_used(memory_, 0, 0));
  }

  memory::GuestMemory memory_;
  DriverQueue driver_;
  Queue queue_;
};

TEST_F(QueueTest, UndoPopHandsTheSameChainsOutAgain) {
  activate(true, true);
  driver_.add_chain({{0x10000, 64, true}}, 0);
  driver_.add_chain({{0x11000, 128, true}}, 1);
  DescriptorChain first, second;
  ASSERT_EQ(queue_.pop(memory_, first), Queue::PopStatus::kChain);
  ASSERT_EQ(queue_.pop(memory_, second), Queue::PopStatus::kChain);
  EXPECT_EQ(queue_.next_avail(), 2);
  queue_.undo_pop(2);
  EXPECT_EQ(queue_.next_avail(), 0);
  // Chains given back are still pending: re-arming notifications reports them and points
  // avail_event at the first one.
  EXPECT_TRUE(queue_.enable_notification());
  EXPECT_EQ(driver_.avail_event(), 0);
  DescriptorChain again;
  ASSERT_EQ(queue_.pop(memory_, again), Queue::PopStatus::kChain);
  EXPECT_EQ(again.head, first.head);
  EXPECT_EQ(again.writable_bytes, 64u);
  queue_.undo_pop();
  ASSERT_EQ(queue_.pop(memory_, again), Queue::PopStatus::kChain);
  EXPECT_EQ(again.head, 0);
  ASSERT_EQ(queue_.pop(memory_, again), Queue::PopStatus::kChain);
  EXPECT_EQ(again.head, 1);
  EXPECT_EQ(queue_.pop(memory_, again), Queue::PopStatus::kEmpty);
  EXPECT_FALSE(queue_.enable_notification());
  EXPECT_EQ(driver_.avail_event(), 2);
}

TEST_F(QueueTest, PopsChainAndPublishesUsedElement) {
  activate();
  driver_.add_chain({{0x10000, 16, false}, {0x11000, 512, true}, {0x12000, 1, true}}, 0);
  DescriptorChain chain;
  ASSERT_EQ(queue_.pop(memory_, chain), Queue::PopStatus::kChain);
  EXPECT_EQ(chain.head, 0);
  ASSERT_EQ(chain.descriptors.size(), 3u);
  EXPECT_EQ(chain.readable_bytes, 16u);
  EXPECT_EQ(chain.writable_bytes, 513u);
  EXPECT_EQ(chain.descriptors[1].host, memory_.slice(0x11000, 512)->data());
  EXPECT_EQ(queue_.pop(memory_, chain), Queue::PopStatus::kEmpty);

  ASSERT_TRUE(queue_.add_used(memory_, chain.head, 513));
  EXPECT_EQ(driver_.used_idx(), 1);
  EXPECT_EQ(driver_.used_element(0), std::make_pair(0u, 513u));
}

TEST_F(QueueTest, FollowsIndirectTable) {
  activate();
  driver_.add_indirect_chain({{0x10000, 16, false}, {0x11000, 64, true}}, 3, 0x8000);
  DescriptorChain chain;
  ASSERT_EQ(queue_.pop(memory_, chain), Queue::PopStatus::kChain);
  EXPECT_EQ(chain.head, 3);
  ASSERT_EQ(chain.descriptors.size(), 2u);
  EXPECT_EQ(chain.descriptors[1].gpa, 0x11000u);
  EXPECT_TRUE(chain.descriptors[1].writable);
}

TEST_F(QueueTest, RejectsBufferOutsideGuestMemory) {
  activate();
  driver_.add_chain({{kRam - 8, 16, true}}, 0);
  expect_rejected("outside guest memory");
}

TEST_F(QueueTest, RejectsBufferWrappingTheAddressSpace) {
  activate();
  driver_.add_chain({{~0ull - 4, 16, false}}, 0);
  expect_rejected("outside guest memory");
}

TEST_F(QueueTest, RejectsChainLoop) {
  activate();
  driver_.write_descriptor(driver_.desc(), 0, 0x10000, 8, kDescFlagNext, 1);
  driver_.write_descriptor(driver_.desc(), 1, 0x10000, 8, kDescFlagNext, 0);
  driver_.publish(0);
  expect_rejected("loops");
}

TEST_F(QueueTest, RejectsChainLongerThanQueue) {
  activate();
  // Every descriptor chained to the next, the last back to the first: kSize + 1 hops.
  for (uint16_t i = 0; i < kSize; ++i)
    driver_.write_descriptor(driver_.desc(), i, 0x10000, 8, kDescFlagNext,
                             uint16_t((i + 1) % kSize));
  driver_.publish(0);
  expect_rejected("longer than its table");
}

TEST_F(QueueTest, RejectsIndirectInsideIndirect) {
  activate();
  driver_.write_descriptor(0x8000, 0, 0x9000, 16, kDescFlagIndirect, 0);
  driver_.write_descriptor(driver_.desc(), 0, 0x8000, 16, kDescFlagIndirect, 0);
  driver_.publish(0);
  expect_rejected("inside an indirect table");
}

TEST_F(QueueTest, RejectsIndirectTableLengthNotMultipleOf16) {
  activate();
  driver_.write_descriptor(driver_.desc(), 0, 0x8000, 24, kDescFlagIndirect, 0);
  driver_.publish(0);
  expect_rejected("not a multiple of 16");
}

TEST_F(QueueTest, RejectsIndirectWithoutNegotiation) {
  activate(/*indirect=*/false);
  driver_.add_indirect_chain({{0x10000, 16, false}}, 0, 0x8000);
  expect_rejected("VIRTIO_F_INDIRECT_DESC");
}

TEST_F(QueueTest, RejectsIndirectTableOutsideMemory) {
  activate();
  driver_.write_descriptor(driver_.desc(), 0, kRam - 16, 32, kDescFlagIndirect, 0);
  driver_.publish(0);
  expect_rejected("indirect table outside");
}

TEST_F(QueueTest, RejectsIndirectNextOutOfTable) {
  activate();
  driver_.write_descriptor(0x8000, 0, 0x10000, 8, kDescFlagNext, 5);  // table has 1 entry
  driver_.write_descriptor(driver_.desc(), 0, 0x8000, 16, kDescFlagIndirect, 0);
  driver_.publish(0);
  expect_rejected("out of range");
}

TEST_F(QueueTest, RejectsReadableAfterWritable) {
  activate();
  driver_.add_chain({{0x10000, 16, true}, {0x11000, 16, false}}, 0);
  expect_rejected("readable descriptor after a writable one");
}

TEST_F(QueueTest, RejectsHeadIndexOutOfRange) {
  activate();
  driver_.publish(kSize);
  expect_rejected("head descriptor index");
}

TEST_F(QueueTest, RejectsAvailIndexJumpingPastQueueSize) {
  activate();
  driver_.set_avail_idx(kSize + 1);
  expect_rejected("available index moved");
}

TEST_F(QueueTest, RefusesSizeThatIsNotPowerOfTwo) {
  queue_.set_size(6);
  EXPECT_NE(queue_.activate(memory_), std::nullopt);
  EXPECT_FALSE(queue_.active());
  DescriptorChain chain;
  EXPECT_EQ(queue_.pop(memory_, chain), Queue::PopStatus::kEmpty);
}

TEST_F(QueueTest, RefusesSizeAboveMaximum) {
  queue_.set_size(kSize * 2);
  EXPECT_NE(queue_.activate(memory_), std::nullopt);
}

TEST_F(QueueTest, RefusesUsedRingOutsideMemory) {
  queue_.set_used_ring(kRam - 8);
  auto error = queue_.activate(memory_);
  ASSERT_NE(error, std::nullopt);
  EXPECT_NE(error->find("used ring"), std::string::npos);
}

TEST_F(QueueTest, RefusesMisalignedRings) {
  queue_.set_desc_table(0x1008);
  EXPECT_NE(queue_.activate(memory_), std::nullopt);
}

TEST_F(QueueTest, NoInterruptFlagSuppressesWithoutEventIdx) {
  activate();
  ASSERT_TRUE(queue_.add_used(memory_, 0, 0));
  EXPECT_TRUE(queue_.needs_notification());
  driver_.set_avail_flags(kAvailFlagNoInterrupt);
  ASSERT_TRUE(queue_.add_used(memory_, 0, 0));
  EXPECT_FALSE(queue_.needs_notification());
}

TEST_F(QueueTest, SeveralUsedElementsArePublishedWithOneIndexMove) {
  activate(true, /*event_idx=*/true);
  ASSERT_TRUE(queue_.add_used(memory_, 0, 0));  // used idx 1
  EXPECT_TRUE(queue_.needs_notification());
  driver_.set_used_event(2);  // wake me when idx passes 2
  const Queue::UsedElement batch[] = {{5, 100}, {6, 200}, {7, 300}};
  ASSERT_TRUE(queue_.add_used(memory_, batch));
  EXPECT_EQ(driver_.used_idx(), 4);
  EXPECT_EQ(driver_.used_element(1), std::make_pair(5u, 100u));
  EXPECT_EQ(driver_.used_element(3), std::make_pair(7u, 300u));
  // One interrupt for the batch, which crossed used_event somewhere inside it.
  EXPECT_TRUE(queue_.needs_notification());
  ASSERT_TRUE(queue_.add_used(memory_, std::span<const Queue::UsedElement>()));
  EXPECT_EQ(driver_.used_idx(), 4);
  // More than a ring's worth would overwrite entries the driver has not consumed.
  std::vector<Queue::UsedElement> too_many(kSize + 1, {0, 0});
  EXPECT_FALSE(queue_.add_used(memory_, too_many));
  EXPECT_TRUE(queue_.broken());
  EXPECT_EQ(driver_.used_idx(), 4);
}

TEST_F(QueueTest, EventIdxSuppressesUntilUsedEventIsCrossed) {
  activate(true, /*event_idx=*/true);
  ASSERT_TRUE(queue_.add_used(memory_, 0, 0));  // used idx 1
  EXPECT_TRUE(queue_.needs_notification());     // first notification always goes out
  driver_.set_used_event(3);                    // driver: wake me when idx passes 3
  ASSERT_TRUE(queue_.add_used(memory_, 0, 0));  // 2
  EXPECT_FALSE(queue_.needs_notification());
  ASSERT_TRUE(queue_.add_used(memory_, 0, 0));  // 3
  EXPECT_FALSE(queue_.needs_notification());
  ASSERT_TRUE(queue_.add_used(memory_, 0, 0));  // 4 crosses used_event 3
  EXPECT_TRUE(queue_.needs_notification());
  ASSERT_TRUE(queue_.add_used(memory_, 0, 0));  // 5, event 3 already behind
  EXPECT_FALSE(queue_.needs_notification());
  // The NO_INTERRUPT flag is ignored once EVENT_IDX is negotiated.
  driver_.set_used_event(5);
  driver_.set_avail_flags(kAvailFlagNoInterrupt);
  ASSERT_TRUE(queue_.add_used(memory_, 0, 0));  // 6 crosses 5
  EXPECT_TRUE(queue_.needs_notification());
}

TEST_F(QueueTest, EnableNotificationPublishesAvailEventAndSeesNewWork) {
  activate(true, true);
  driver_.add_chain({{0x10000, 8, false}}, 0);
  DescriptorChain chain;
  ASSERT_EQ(queue_.pop(memory_, chain), Queue::PopStatus::kChain);
  EXPECT_FALSE(queue_.enable_notification());
  EXPECT_EQ(driver_.avail_event(), 1);
  driver_.add_chain({{0x10000, 8, false}}, 1);
  EXPECT_TRUE(queue_.enable_notification());
}

TEST_F(QueueTest, SaveRestoreKeepsRingPositions) {
  activate();
  driver_.add_chain({{0x10000, 8, false}}, 0);
  DescriptorChain chain;
  ASSERT_EQ(queue_.pop(memory_, chain), Queue::PopStatus::kChain);
  ASSERT_TRUE(queue_.add_used(memory_, chain.head, 0));
  QueueState state = queue_.save();

  Queue restored(kSize);
  restored.restore(state, memory_);
  EXPECT_TRUE(restored.active());
  EXPECT_EQ(restored.next_avail(), 1);
  EXPECT_EQ(restored.next_used(), 1);
  driver_.add_chain({{0x10000, 8, false}}, 1);
  ASSERT_EQ(restored.pop(memory_, chain), Queue::PopStatus::kChain);
  EXPECT_EQ(chain.head, 1);
}

}  // namespace
}  // namespace kiln::devices::virtio
