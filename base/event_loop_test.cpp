#include "base/event_loop.h"

#include <gtest/gtest.h>
#include <sys/eventfd.h>

#include <atomic>
#include <chrono>
#include <thread>

namespace kiln {
namespace {

void signal(int fd) {
  uint64_t one = 1;
  ASSERT_EQ(::write(fd, &one, sizeof(one)), 8);
}

bool wait_for(const std::atomic<int>& value, int expected) {
  for (int i = 0; i < 2000 && value.load() < expected; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  return value.load() >= expected;
}

TEST(EventLoop, RunsCallbacksOnTheLoopThread) {
  EventLoop loop;
  UniqueFd fd(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  std::atomic<int> calls{0};
  std::thread::id callback_thread;
  loop.add(fd.get(), [&](uint32_t events) {
    uint64_t value;
    ASSERT_EQ(::read(fd.get(), &value, sizeof(value)), 8);
    EXPECT_TRUE(events & EPOLLIN);
    EXPECT_TRUE(loop.on_loop_thread());
    callback_thread = std::this_thread::get_id();
    calls++;
  });
  loop.start_thread();
  signal(fd.get());
  ASSERT_TRUE(wait_for(calls, 1));
  EXPECT_NE(callback_thread, std::this_thread::get_id());
  EXPECT_FALSE(loop.on_loop_thread());
  loop.join_thread();
}

TEST(EventLoop, RemoveWaitsForRunningCallbackAndStopsDelivery) {
  EventLoop loop;
  UniqueFd fd(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  std::atomic<int> entered{0};
  std::atomic<bool> finished{false};
  loop.add(fd.get(), [&](uint32_t) {
    uint64_t value;
    [[maybe_unused]] ssize_t ignored = ::read(fd.get(), &value, sizeof(value));
    entered++;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    finished = true;
  });
  loop.start_thread();
  signal(fd.get());
  ASSERT_TRUE(wait_for(entered, 1));
  loop.remove(fd.get());
  EXPECT_TRUE(finished);  // remove() returned only after the callback did
  signal(fd.get());
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_EQ(entered, 1);
}

TEST(EventLoop, CallbackMayRemoveItself) {
  EventLoop loop;
  UniqueFd fd(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  std::atomic<int> calls{0};
  loop.add(fd.get(), [&](uint32_t) {
    calls++;
    loop.remove(fd.get());  // level-triggered fd left readable: must not fire again
  });
  loop.start_thread();
  signal(fd.get());
  ASSERT_TRUE(wait_for(calls, 1));
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_EQ(calls, 1);
}

TEST(EventLoop, StopIsThreadSafeAndRestartable) {
  EventLoop loop;
  UniqueFd fd(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  std::atomic<int> calls{0};
  loop.add(fd.get(), [&](uint32_t) {
    uint64_t value;
    [[maybe_unused]] ssize_t ignored = ::read(fd.get(), &value, sizeof(value));
    calls++;
  });
  loop.start_thread();
  std::thread stopper([&] { loop.stop(); });
  stopper.join();
  loop.join_thread();
  loop.start_thread();
  signal(fd.get());
  EXPECT_TRUE(wait_for(calls, 1));
  loop.join_thread();
  EXPECT_THROW(loop.add(fd.get(), [](uint32_t) {}), std::invalid_argument);
}

}  // namespace
}  // namespace kiln
