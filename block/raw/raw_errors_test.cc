// Opening: clear errors for what cannot be a disk, and the choice of engine.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <system_error>

#include "block/raw/raw.h"
#include "block/raw/raw_test_util.h"

namespace kiln::block {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using testing::ScratchFile;

// The message open_raw throws for `path`, or "" when it opens.
std::string open_error(const std::string& path, const RawOptions& options = {}) {
  try {
    open_raw(path, options);
  } catch (const std::system_error& error) {
    return error.what();
  }
  return "";
}

TEST(RawOpenTest, MissingFileNamesThePathAndTheCause) {
  const std::string path = testing::scratch_dir() + "/does-not-exist.img";
  EXPECT_THAT(open_error(path),
              AllOf(HasSubstr(path), HasSubstr("does not exist"), HasSubstr("No such file")));
  try {
    open_raw(path);
  } catch (const std::system_error& error) {
    EXPECT_EQ(error.code(), std::errc::no_such_file_or_directory);
  }
}

TEST(RawOpenTest, DirectoryIsRefused) {
  const std::string dir = testing::scratch_dir();
  EXPECT_THAT(open_error(dir), AllOf(HasSubstr(dir), HasSubstr("is a directory")));
  RawOptions read_only;
  read_only.read_only = true;  // O_RDONLY opens a directory fine: the fstat check must catch it
  EXPECT_THAT(open_error(dir, read_only), HasSubstr("is a directory"));
}

TEST(RawOpenTest, CharacterDeviceIsRefused) {
  EXPECT_THAT(
      open_error("/dev/null"),
      AllOf(HasSubstr("/dev/null"), HasSubstr("neither a regular file nor a block device")));
}

// The message open_raw throws for `path` when run as an unprivileged user (in a child process,
// so the test itself keeps its identity), or "" when it opens.
std::string open_error_as_nobody(const std::string& path) {
  if (geteuid() != 0) return open_error(path);
  int channel[2];
  if (::pipe(channel) != 0) return "pipe failed";
  const pid_t child = ::fork();
  if (child == 0) {
    ::close(channel[0]);
    std::string message = "setuid failed";
    if (::setgid(65534) == 0 && ::setuid(65534) == 0) message = open_error(path);
    if (::write(channel[1], message.data(), message.size()) < 0) _exit(1);
    _exit(0);
  }
  ::close(channel[1]);
  std::string message;
  char chunk[256];
  for (ssize_t got; (got = ::read(channel[0], chunk, sizeof chunk)) > 0;)
    message.append(chunk, got);
  ::close(channel[0]);
  ::waitpid(child, nullptr, 0);
  return message;
}

TEST(RawOpenTest, PermissionDeniedSuggestsReadOnly) {
  ScratchFile file(4096);
  std::filesystem::permissions(
      file.path(), std::filesystem::perms::owner_read | std::filesystem::perms::owner_write |
                       std::filesystem::perms::group_read | std::filesystem::perms::others_read);
  const std::string message = open_error_as_nobody(file.path());
  if (message == "setuid failed") GTEST_SKIP() << "cannot drop privileges here";
  EXPECT_THAT(message, AllOf(HasSubstr(file.path()), HasSubstr("permission denied"),
                             HasSubstr("read-only")));
}

TEST(RawOpenTest, ODirectOnTmpfsIsExplained) {
  const std::string shm_path = "/dev/shm/kiln-raw-test-" + std::to_string(getpid());
  FILE* created = std::fopen(shm_path.c_str(), "w");
  if (created == nullptr) GTEST_SKIP() << "no /dev/shm here";
  std::fputs("data", created);
  std::fclose(created);
  RawOptions options;
  options.cache = CacheMode::kNone;
  const std::string message = open_error(shm_path, options);
  if (message.empty()) {
    // Newer kernels' tmpfs accepts O_DIRECT: then the device must simply work there.
    auto device = open_raw_device(shm_path, options);
    std::vector<uint8_t> back(4);  // the whole file: the device ends where the file does
    EXPECT_EQ(testing::read_sync(*device, 0, back.data(), back.size()), 0);
    EXPECT_EQ(std::string(back.begin(), back.end()), "data");
  } else {
    EXPECT_THAT(message,
                AllOf(HasSubstr(shm_path), HasSubstr("O_DIRECT"), HasSubstr("cache=writeback")));
  }
  ::unlink(shm_path.c_str());
}

TEST(RawOpenTest, FallsBackToThreadsWhenIoUringCannotStart) {
  ScratchFile file(65536);
  RawOptions options;
  options.aio = AioEngine::kIoUring;
  options.inject_uring_init_error = ENOSYS;
  auto device = open_raw_device(file.path(), options);
  EXPECT_EQ(device->engine(), AioEngine::kThreads);
  std::vector<uint8_t> data(4096, 0x3C), back(4096);
  ASSERT_EQ(testing::write_sync(*device, 4096, data.data(), data.size()), 0);
  ASSERT_EQ(testing::read_sync(*device, 4096, back.data(), back.size()), 0);
  EXPECT_EQ(back, data);
}

TEST(RawOpenTest, UsesTheEngineAskedFor) {
  ScratchFile file(65536);
  RawOptions options;
  options.aio = AioEngine::kThreads;
  EXPECT_EQ(open_raw_device(file.path(), options)->engine(), AioEngine::kThreads);
  options.aio = AioEngine::kIoUring;
  auto device = open_raw_device(file.path(), options);
  if (device->engine() != AioEngine::kIoUring) GTEST_SKIP() << "io_uring unavailable here";
  EXPECT_EQ(device->engine(), AioEngine::kIoUring);
}

TEST(RawOpenTest, OpenRawReturnsTheGenericInterface) {
  ScratchFile file(12345);
  std::unique_ptr<BlockDevice> device = open_raw(file.path());
  EXPECT_EQ(device->size(), 12345u);
  EXPECT_EQ(device->alignment(), 1u);
}

}  // namespace
}  // namespace kiln::block
