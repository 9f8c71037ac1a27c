#include "base/spin.h"

#include <gtest/gtest.h>

#include <atomic>
#include <thread>

namespace kiln {
namespace {

using std::chrono::milliseconds;
using std::chrono::steady_clock;

TEST(SpinUntil, ReturnsAtOnceWhenAlreadyDone) {
  int calls = 0;
  EXPECT_TRUE(spin_until([&] { return ++calls > 0; }, steady_clock::now() + milliseconds(1000)));
  EXPECT_EQ(calls, 1);
}

TEST(SpinUntil, GivesUpAtTheDeadline) {
  const auto start = steady_clock::now();
  EXPECT_FALSE(spin_until([] { return false; }, start + milliseconds(20)));
  EXPECT_GE(steady_clock::now() - start, milliseconds(20));
}

TEST(SpinUntil, SeesAnotherThreadsStore) {
  std::atomic<bool> flag{false};
  std::thread setter([&] {
    std::this_thread::sleep_for(milliseconds(5));
    flag.store(true, std::memory_order_release);
  });
  EXPECT_TRUE(spin_until([&] { return flag.load(std::memory_order_acquire); },
                         steady_clock::now() + milliseconds(10000)));
  setter.join();
}

}  // namespace
}  // namespace kiln
