// A single-threaded epoll loop that device back-ends run on, so that guest-visible work (queue
// processing, completions that need the device) never happens on a vCPU thread.
#pragma once

#include <sys/epoll.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>

#include "base/unique_fd.h"

namespace kiln {

class EventLoop {
 public:
  // Called on the loop thread with the epoll events that fired (EPOLLIN, EPOLLHUP, ...).
  using Callback = std::function<void(uint32_t events)>;

  EventLoop();
  ~EventLoop();
  EventLoop(const EventLoop&) = delete;
  EventLoop& operator=(const EventLoop&) = delete;

  // Watches `fd` (level-triggered) until remove(). Throws std::system_error on epoll failure
  // and std::invalid_argument if `fd` is already watched. Callable from any thread.
  void add(int fd, Callback callback, uint32_t events = EPOLLIN);
  // Stops watching `fd`. When this returns, the callback is not running on the loop thread and
  // never runs again, unless remove() was called from that very callback (which is allowed).
  void remove(int fd);

  // Dispatches events until stop(). Runs on the calling thread.
  void run();
  // Makes run() return after the callback in progress, if any. Thread-safe, idempotent.
  void stop();

  // Convenience: run() on a new thread; join_thread() (also done by the destructor) stops it.
  void start_thread();
  void join_thread();

  bool on_loop_thread() const { return std::this_thread::get_id() == loop_thread_.load(); }

 private:
  struct Watch {
    Callback callback;
  };

  UniqueFd epoll_;
  UniqueFd wake_;  // eventfd that stop() signals
  std::atomic<bool> stopping_{false};
  std::atomic<std::thread::id> loop_thread_{};
  // Held by the loop while a callback runs, so that remove() from another thread waits for it.
  std::recursive_mutex dispatch_mutex_;
  std::mutex watches_mutex_;
  std::map<int, std::shared_ptr<Watch>> watches_;
  std::thread thread_;
};

}  // namespace kiln
