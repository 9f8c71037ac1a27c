// Guest-triggered errors are logged, but a hostile guest must not be able to flood the log:
// at most `burst` lines per `interval`, then a count of what was suppressed.
#pragma once

#include <spdlog/spdlog.h>

#include <chrono>
#include <mutex>
#include <string>

namespace kiln::devices::virtio {

class RateLimitedLog {
 public:
  explicit RateLimitedLog(int burst = 10, std::chrono::seconds interval = std::chrono::seconds(5))
      : burst_(burst), interval_(interval) {}

  void warn(const std::string& message) {
    std::lock_guard lock(mutex_);
    auto now = std::chrono::steady_clock::now();
    if (now - window_start_ >= interval_) {
      if (suppressed_) spdlog::warn("{} similar messages suppressed", suppressed_);
      window_start_ = now;
      logged_ = 0;
      suppressed_ = 0;
    }
    if (logged_ < burst_) {
      ++logged_;
      spdlog::warn("{}", message);
    } else {
      ++suppressed_;
    }
  }

 private:
  std::mutex mutex_;
  int burst_;
  std::chrono::steady_clock::duration interval_;
  std::chrono::steady_clock::time_point window_start_{};
  int logged_ = 0;
  int suppressed_ = 0;
};

}  // namespace kiln::devices::virtio
