#include "vmm/console.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <poll.h>
#include <pty.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <termios.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <thread>

#include "base/unique_fd.h"

namespace kiln::vmm {
namespace {

constexpr uint8_t kEscape = 0x01;  // Ctrl-A, as QEMU: Ctrl-A x quits, Ctrl-A Ctrl-A sends one

void write_all(int fd, std::span<const uint8_t> bytes) {
  while (!bytes.empty()) {
    ssize_t n = ::write(fd, bytes.data(), bytes.size());
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;  // nobody reads (closed pipe, full non-blocking pty): drop the rest
    bytes = bytes.subspan(size_t(n));
  }
}

// Reads `fd` on a thread of its own until EOF, handing bytes to `input`.
class InputThread {
 public:
  ~InputThread() {
    if (thread_.joinable()) thread_.detach();  // blocked in read() on a terminal: let exit reap it
  }
  void start(int fd, std::function<void(std::span<const uint8_t>)> input) {
    thread_ = std::thread([fd, input] {
      uint8_t buffer[256];
      for (;;) {
        ssize_t n = ::read(fd, buffer, sizeof(buffer));
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return;
        input({buffer, size_t(n)});
      }
    });
  }

 private:
  std::thread thread_;
};

class StdioConsole : public HostConsole {
 public:
  StdioConsole() {
    if (isatty(STDIN_FILENO) && tcgetattr(STDIN_FILENO, &saved_) == 0) {
      termios raw = saved_;
      cfmakeraw(&raw);
      raw.c_oflag |= OPOST | ONLCR;  // keep "\n" -> "\r\n" so host-side messages stay readable
      tcsetattr(STDIN_FILENO, TCSANOW, &raw);
      raw_ = true;
    }
  }
  ~StdioConsole() override {
    if (raw_) tcsetattr(STDIN_FILENO, TCSANOW, &saved_);
  }
  void write(std::span<const uint8_t> bytes) override { write_all(STDOUT_FILENO, bytes); }
  void start(std::function<void(std::span<const uint8_t>)> input,
             std::function<void()> quit) override {
    reader_.start(STDIN_FILENO, [this, input, quit](std::span<const uint8_t> bytes) {
      std::vector<uint8_t> out;
      for (uint8_t b : bytes) {
        if (escaped_) {
          escaped_ = false;
          if (b == 'x' && raw_) return quit();
          out.push_back(b);
        } else if (b == kEscape && raw_) {
          escaped_ = true;
        } else {
          out.push_back(b);
        }
      }
      if (!out.empty()) input(out);
    });
  }

 private:
  termios saved_{};
  bool raw_ = false;
  bool escaped_ = false;
  InputThread reader_;
};

class FdConsole : public HostConsole {
 public:
  // drop_when_full: a pty nobody reads must not stall the guest's vCPU on a full buffer.
  FdConsole(UniqueFd out, UniqueFd in, bool drop_when_full = false)
      : out_(std::move(out)), in_(std::move(in)), drop_when_full_(drop_when_full) {}
  void write(std::span<const uint8_t> bytes) override {
    if (!out_) return;
    if (drop_when_full_) {
      pollfd pfd{out_.get(), POLLOUT, 0};
      if (::poll(&pfd, 1, 0) != 1 || !(pfd.revents & POLLOUT)) return;
    }
    write_all(out_.get(), bytes);
  }
  void start(std::function<void(std::span<const uint8_t>)> input, std::function<void()>) override {
    if (in_) reader_.start(in_.get(), std::move(input));
  }

 private:
  UniqueFd out_, in_;
  bool drop_when_full_;
  InputThread reader_;
};

// A unix socket server: output goes to the connected client (or nowhere), input comes from it.
class SocketConsole : public HostConsole {
 public:
  SocketConsole(const std::string& path, const std::string& flag) : path_(path) {
    sockaddr_un addr{};
    if (path.size() >= sizeof(addr.sun_path))
      throw ConfigError(fmt::format("{} socket path is too long: {}", flag, path));
    listener_.reset(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    addr.sun_family = AF_UNIX;
    std::strcpy(addr.sun_path, path.c_str());
    ::unlink(path.c_str());
    if (::bind(listener_.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) < 0 ||
        ::listen(listener_.get(), 1) < 0)
      throw ConfigError(fmt::format("{} socket:{}: {}", flag, path, std::strerror(errno)));
  }
  ~SocketConsole() override {
    ::unlink(path_.c_str());
    {
      // Wake the thread wherever it blocks: accept() on the listener, or read() on a client
      // that is still connected (without this, kiln hung at exit while a client was attached).
      std::lock_guard lock(mutex_);
      closing_ = true;
      if (client_ >= 0) ::shutdown(client_, SHUT_RDWR);
    }
    ::shutdown(listener_.get(), SHUT_RDWR);
    if (thread_.joinable()) thread_.join();
  }
  void write(std::span<const uint8_t> bytes) override {
    std::lock_guard lock(mutex_);
    if (client_ >= 0) {
      ssize_t n = ::send(client_, bytes.data(), bytes.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
      (void)n;  // a client that does not read loses output rather than stalling the guest
    }
  }
  void start(std::function<void(std::span<const uint8_t>)> input, std::function<void()>) override {
    thread_ = std::thread([this, input] { serve(input); });
  }

 private:
  void serve(const std::function<void(std::span<const uint8_t>)>& input) {
    for (;;) {
      int fd = ::accept4(listener_.get(), nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) {
        if (errno == EINTR) continue;
        return;
      }
      if (!set_client(fd)) {
        ::close(fd);
        return;
      }
      uint8_t buffer[256];
      ssize_t n;
      while ((n = ::read(fd, buffer, sizeof(buffer))) > 0 || (n < 0 && errno == EINTR))
        if (n > 0) input({buffer, size_t(n)});
      set_client(-1);
      ::close(fd);
    }
  }
  // False when the console is closing (the new client is not served).
  bool set_client(int fd) {
    std::lock_guard lock(mutex_);
    if (closing_ && fd >= 0) return false;
    client_ = fd;
    return true;
  }

  std::string path_;
  UniqueFd listener_;
  std::mutex mutex_;
  int client_ = -1;
  bool closing_ = false;
  std::thread thread_;
};

std::unique_ptr<HostConsole> open_pty(const std::string& flag) {
  int master = -1, slave = -1;
  char name[128] = {};
  if (openpty(&master, &slave, name, nullptr, nullptr) < 0)
    throw ConfigError(fmt::format("{} pty: {}", flag, std::strerror(errno)));
  termios raw{};
  tcgetattr(slave, &raw);
  cfmakeraw(&raw);
  tcsetattr(slave, TCSANOW, &raw);
  ::close(slave);
  fmt::print(stderr, "kiln: {} on {}\n",
             flag == "--serial" ? "serial console" : "virtio console (hvc0)", name);
  int input = ::dup(master);
  return std::make_unique<FdConsole>(UniqueFd(master), UniqueFd(input), true);
}

}  // namespace

std::unique_ptr<HostConsole> open_console(const SerialConfig& config, const std::string& flag) {
  switch (config.mode) {
    case SerialConfig::Mode::kStdio:
      return std::make_unique<StdioConsole>();
    case SerialConfig::Mode::kPty:
      return open_pty(flag);
    case SerialConfig::Mode::kFile: {
      int fd = ::open(config.path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
      if (fd < 0)
        throw ConfigError(fmt::format("{} file:{}: {}", flag, config.path, std::strerror(errno)));
      return std::make_unique<FdConsole>(UniqueFd(fd), UniqueFd());
    }
    case SerialConfig::Mode::kSocket:
      return std::make_unique<SocketConsole>(config.path, flag);
    case SerialConfig::Mode::kOff:
      return std::make_unique<FdConsole>(UniqueFd(), UniqueFd());
  }
  throw ConfigError("unknown serial mode");
}

}  // namespace kiln::vmm
