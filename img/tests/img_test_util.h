// Shared by the kiln-img subcommand tests: run kiln-img and qemu-img on the same arguments in one
// temp dir and compare what the user sees (stdout, exit code, and whether stderr said anything).
#pragma once

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <string>

#include "block/qcow2/qcow2.h"
#include "block/qcow2/tests/test_util.h"

namespace kiln::img::testing {

using block::qcow2::testing::must;
using block::qcow2::testing::q;
using block::qcow2::testing::read_file;
using block::qcow2::testing::TempDir;

inline const std::string kKilnImg = KILN_IMG_PATH;

struct ToolResult {
  int status = -1;
  std::string out;  // stdout
  std::string err;  // stderr
};

// Runs `cmd` through /bin/sh with stdout and stderr captured separately.
inline ToolResult run_split(const std::string& cmd, const std::string& err_file) {
  auto r = block::qcow2::testing::run(fmt::format("( {{ {} ; }} 2>{} )", cmd, q(err_file)));
  ToolResult t;
  t.status = r.status;
  t.out = r.out;
  auto bytes = read_file(err_file);
  t.err.assign(bytes.begin(), bytes.end());
  return t;
}

// Output with qemu's progress meter lines ("    (12.50/100%)\r") taken out: how often the meter is
// redrawn depends on each tool's internal chunking.
inline std::string without_progress(const std::string& out) {
  std::string result;
  size_t pos = 0;
  while (pos < out.size()) {
    const size_t open = out.find("    (", pos);
    const size_t close = open == std::string::npos ? open : out.find("/100%)\r", open);
    if (close == std::string::npos) {
      result += out.substr(pos);
      break;
    }
    result += out.substr(pos, open - pos);
    pos = close + 7;
  }
  return result;
}

class ImgToolTest : public ::testing::Test {
 protected:
  void SetUp() override { block::qcow2::testing::require_qemu_tools(); }

  std::string path(const std::string& name) const { return dir_ / name; }
  // Runs a shell command inside the temp dir; fails the test unless it exits 0.
  std::string sh(const std::string& cmd) {
    return must(fmt::format("cd {} && {}", q(dir_.path()), cmd));
  }
  ToolResult kiln(const std::string& args) {
    return run_split(fmt::format("cd {} && {} {}", q(dir_.path()), kKilnImg, args),
                     path(".stderr"));
  }
  ToolResult qemu(const std::string& args) {
    return run_split(fmt::format("cd {} && qemu-img {}", q(dir_.path()), args), path(".stderr"));
  }
  // Both tools on the same arguments: same exit code, same stdout, and an error message on stderr
  // from both or from neither. Returns kiln's result.
  ToolResult expect_same(const std::string& args) {
    const ToolResult k = kiln(args), qm = qemu(args);
    EXPECT_EQ(k.status, qm.status)
        << args << "\nkiln: " << k.out << k.err << "\nqemu: " << qm.out << qm.err;
    EXPECT_EQ(k.out, qm.out) << args << "\nkiln stderr: " << k.err << "\nqemu stderr: " << qm.err;
    EXPECT_EQ(k.err.empty(), qm.err.empty()) << args << "\nkiln: " << k.err << "\nqemu: " << qm.err;
    if (!k.err.empty()) {
      EXPECT_EQ(k.err.rfind("kiln-img: ", 0), 0u) << args << "\n" << k.err;
    }
    return k;
  }
  // Files `a` and `b` in the temp dir read the same through `qemu-img compare`.
  void expect_same_content(const std::string& a, const std::string& b) {
    auto r = qemu(fmt::format("compare {} {}", q(a), q(b)));
    EXPECT_EQ(r.status, 0) << a << " vs " << b << "\n" << r.out << r.err;
  }
  void expect_check_clean(const std::string& img) {
    auto r = qemu(fmt::format("check {}", q(img)));
    EXPECT_EQ(r.status, 0) << img << "\n" << r.out << r.err;
  }

  TempDir dir_;
};

}  // namespace kiln::img::testing
