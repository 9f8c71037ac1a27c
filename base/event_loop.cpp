#include "base/event_loop.h"

#include <sys/eventfd.h>

#include <stdexcept>

#include "base/errors.h"

namespace kiln {

EventLoop::EventLoop()
    : epoll_(epoll_create1(EPOLL_CLOEXEC)), wake_(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {
  if (!epoll_) throw_errno("epoll_create1");
  if (!wake_) throw_errno("eventfd");
  epoll_event event{};
  event.events = EPOLLIN;
  event.data.fd = wake_.get();
  if (epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, wake_.get(), &event) < 0) throw_errno("epoll_ctl");
}

EventLoop::~EventLoop() { join_thread(); }

void EventLoop::add(int fd, Callback callback, uint32_t events) {
  std::lock_guard lock(watches_mutex_);
  if (watches_.count(fd)) throw std::invalid_argument("fd is already watched by the event loop");
  epoll_event event{};
  event.events = events;
  event.data.fd = fd;
  if (epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &event) < 0) throw_errno("epoll_ctl add");
  watches_[fd] = std::make_shared<Watch>(Watch{std::move(callback)});
}

void EventLoop::remove(int fd) {
  {
    std::lock_guard lock(watches_mutex_);
    if (watches_.erase(fd) == 0) return;
    epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, fd, nullptr);
  }
  // Waiting for the dispatch in progress (if any) guarantees the callback is finished. On the
  // loop thread itself the recursive mutex is already ours and this does not block.
  std::lock_guard wait(dispatch_mutex_);
}

void EventLoop::run() {
  loop_thread_ = std::this_thread::get_id();
  constexpr int kMaxEvents = 32;
  epoll_event events[kMaxEvents];
  while (!stopping_.load(std::memory_order_acquire)) {
    int count = epoll_wait(epoll_.get(), events, kMaxEvents, -1);
    if (count < 0) {
      if (errno == EINTR) continue;
      throw_errno("epoll_wait");
    }
    for (int i = 0; i < count && !stopping_.load(std::memory_order_acquire); ++i) {
      int fd = events[i].data.fd;
      if (fd == wake_.get()) {
        uint64_t count_unused;
        [[maybe_unused]] ssize_t drained = ::read(wake_.get(), &count_unused, sizeof(count_unused));
        continue;
      }
      std::lock_guard dispatch(dispatch_mutex_);
      std::shared_ptr<Watch> watch;
      {
        // Looked up again under the dispatch lock: a remove() that raced with epoll_wait wins.
        std::lock_guard lock(watches_mutex_);
        auto it = watches_.find(fd);
        if (it == watches_.end()) continue;
        watch = it->second;
      }
      watch->callback(events[i].events);
    }
  }
  loop_thread_ = std::thread::id{};
}

void EventLoop::stop() {
  stopping_.store(true, std::memory_order_release);
  uint64_t one = 1;
  [[maybe_unused]] ssize_t ignored = ::write(wake_.get(), &one, sizeof(one));
}

void EventLoop::start_thread() {
  if (thread_.joinable()) return;
  stopping_ = false;
  thread_ = std::thread([this] { run(); });
}

void EventLoop::join_thread() {
  if (!thread_.joinable()) return;
  stop();
  thread_.join();
}

}  // namespace kiln
