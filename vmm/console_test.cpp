#include "vmm/console.h"

#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <fstream>
#include <future>
#include <mutex>
#include <string>
#include <thread>

namespace kiln::vmm {
namespace {

using namespace std::chrono_literals;

int connect_to(const std::string& path) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strcpy(addr.sun_path, path.c_str());
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) < 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

struct Collected {
  std::mutex mutex;
  std::condition_variable changed;
  std::string text;
  bool wait_for(const std::string& what) {
    std::unique_lock lock(mutex);
    return changed.wait_for(lock, 5s, [&] { return text.find(what) != std::string::npos; });
  }
};

TEST(SocketConsole, BothWaysAndClosesWithAClientStillAttached) {
  std::string path = ::testing::TempDir() + "/console-test.sock";
  auto console = open_console(parse_serial("socket:" + path), "--console");
  Collected input;
  console->start(
      [&](std::span<const uint8_t> bytes) {
        std::lock_guard lock(input.mutex);
        input.text.append(bytes.begin(), bytes.end());
        input.changed.notify_all();
      },
      [] {});
  int client = connect_to(path);
  ASSERT_GE(client, 0);
  ASSERT_EQ(::write(client, "typed\n", 6), 6);
  EXPECT_TRUE(input.wait_for("typed\n"));
  // Output reaches the client once the server has it (the accept may lag the connect).
  std::string seen;
  for (int i = 0; i < 500 && seen.find("hvc0 says hi") == std::string::npos; ++i) {
    const std::string out = "hvc0 says hi";
    console->write({reinterpret_cast<const uint8_t*>(out.data()), out.size()});
    char buffer[256];
    ssize_t n = ::recv(client, buffer, sizeof(buffer), MSG_DONTWAIT);
    if (n > 0) seen.append(buffer, size_t(n));
    std::this_thread::sleep_for(2ms);
  }
  EXPECT_NE(seen.find("hvc0 says hi"), std::string::npos);
  // The client never hangs up: destroying the console must still return (kiln exiting).
  auto closed = std::async(std::launch::async, [&] { console.reset(); });
  ASSERT_EQ(closed.wait_for(5s), std::future_status::ready) << "the console hung at close";
  EXPECT_NE(::access(path.c_str(), F_OK), 0);  // the socket file is gone
  ::close(client);
}

TEST(SocketConsole, ClosesWithNoClient) {
  std::string path = ::testing::TempDir() + "/console-idle.sock";
  auto console = open_console(parse_serial("socket:" + path), "--console");
  console->start([](std::span<const uint8_t>) {}, [] {});
  auto closed = std::async(std::launch::async, [&] { console.reset(); });
  EXPECT_EQ(closed.wait_for(5s), std::future_status::ready);
}

TEST(FileConsole, WritesGuestOutputAndNamesTheFlagInErrors) {
  std::string path = ::testing::TempDir() + "/hvc0-test.log";
  {
    auto console = open_console(parse_serial("file:" + path), "--console");
    const std::string out = "to the file";
    console->write({reinterpret_cast<const uint8_t*>(out.data()), out.size()});
  }
  std::ifstream in(path);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(text, "to the file");
  try {
    open_console(parse_serial("file:/nonexistent/dir/x.log"), "--console");
    FAIL() << "opened a file in a missing folder";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("--console file:/nonexistent/dir/x.log"),
              std::string::npos)
        << e.what();
  }
}

}  // namespace
}  // namespace kiln::vmm
