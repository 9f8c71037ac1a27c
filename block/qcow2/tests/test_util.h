// Helpers shared by the qcow2 and kiln-img tests: temp dirs, running the QEMU oracles, files.
#pragma once

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

namespace kiln::block::qcow2::testing {

struct CommandResult {
  int status = -1;  // exit code
  std::string out;  // stdout + stderr
};

// Runs `cmd` through /bin/sh, capturing stdout and stderr together.
inline CommandResult run(const std::string& cmd) {
  CommandResult r;
  FILE* p = ::popen((cmd + " 2>&1").c_str(), "r");
  if (!p) return r;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) r.out.append(buf, n);
  const int st = ::pclose(p);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

// Runs `cmd` and fails the test if it does not exit 0.
inline std::string must(const std::string& cmd) {
  auto r = run(cmd);
  EXPECT_EQ(r.status, 0) << cmd << "\n" << r.out;
  return r.out;
}

// The oracles are part of the test contract: their absence is a failure, not a skip.
inline void require_qemu_tools() {
  ASSERT_EQ(run("command -v qemu-img").status, 0)
      << "qemu-img is required (apt install qemu-utils)";
  ASSERT_EQ(run("command -v qemu-io").status, 0) << "qemu-io is required (apt install qemu-utils)";
}

class TempDir {
 public:
  // `base` must exist. /var/tmp where a test needs a disk-backed file system (/tmp may be
  // tmpfs, whose pages never leave memory).
  explicit TempDir(const std::string& base = "/tmp") {
    std::string tmpl = base + "/kiln-qcow2-XXXXXX";
    path_ = ::mkdtemp(tmpl.data());
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

inline std::vector<uint8_t> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  std::vector<uint8_t> out(f ? size_t(f.tellg()) : 0);
  f.seekg(0);
  f.read(reinterpret_cast<char*>(out.data()), std::streamsize(out.size()));
  return out;
}

// Output without the tool's own error lines ("qemu-img: ..." / "kiln-img: ...").
inline std::string without_tool_errors(const std::string& out) {
  std::string result, line;
  for (char c : out) {
    line += c;
    if (c != '\n') continue;
    if (line.rfind("qemu-img: ", 0) != 0 && line.rfind("kiln-img: ", 0) != 0) result += line;
    line.clear();
  }
  return result + line;
}

inline void write_file_at(const std::string& path, uint64_t offset, const std::vector<uint8_t>& b) {
  FILE* f = std::fopen(path.c_str(), "r+b");
  ASSERT_NE(f, nullptr);
  std::fseek(f, long(offset), SEEK_SET);
  std::fwrite(b.data(), 1, b.size(), f);
  std::fclose(f);
}

inline std::string q(const std::string& s) { return "'" + s + "'"; }

}  // namespace kiln::block::qcow2::testing
