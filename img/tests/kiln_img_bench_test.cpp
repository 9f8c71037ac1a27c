// kiln-img bench against qemu-img bench: same report (apart from the measured time), same
// errors and exit codes, and writes that leave the same image contents.
#include <regex>

#include "img/tests/img_test_util.h"

namespace kiln::img::testing {
namespace {

// The report with the measured seconds replaced, so two runs compare equal.
std::string without_time(const std::string& out) {
  static const std::regex kTime(R"(Run completed in [0-9]+\.[0-9]{3} seconds\.)");
  return std::regex_replace(out, kTime, "Run completed in T seconds.");
}

class BenchTest : public ImgToolTest {
 protected:
  void SetUp() override {
    ImgToolTest::SetUp();
    sh("qemu-img create -q -f qcow2 a.qcow2 64M");
    sh("qemu-io -c 'write -P 7 0 8M' a.qcow2 >/dev/null");
    sh("qemu-img create -q -f raw r.raw 16M");
  }
  // Both tools on the same arguments: same exit status, same report apart from the time.
  void expect_same_report(const std::string& args) {
    const ToolResult k = kiln(args), qm = qemu(args);
    EXPECT_EQ(k.status, qm.status)
        << args << "\nkiln: " << k.out << k.err << "\nqemu: " << qm.out << qm.err;
    EXPECT_EQ(without_time(k.out), without_time(qm.out)) << args;
    EXPECT_EQ(k.err.empty(), qm.err.empty()) << args << "\nkiln: " << k.err << "\nqemu: " << qm.err;
  }
};

TEST_F(BenchTest, ReportMatchesQemu) {
  for (const char* args : {
           "bench -c 1000 a.qcow2",
           "bench -c 500 -d 1 -s 512 -S 1M a.qcow2",
           "bench -c 500 -d 8 -o 1.5k -s 8k a.qcow2",
           "bench -c 0 a.qcow2",
           "bench -q -c 10 a.qcow2",
           "bench -f raw -c 300 -d 64 r.raw",
           "bench -c 300 -t none -n r.raw",
           "bench -c 300 -t none -s 1000 r.raw",
           "bench -c 100 -t writethrough -U a.qcow2",
           "bench -w -c 200 -d 16 --pattern 0x33 r.raw",
           "bench -w -c 200 -d 16 --flush-interval 50 a.qcow2",
           "bench -w -c 200 -d 50 --flush-interval 50 --no-drain a.qcow2",
           "bench -w -c 100 -t directsync r.raw",
           "bench -w --no-drain -c 3 a.qcow2",
       }) {
    expect_same_report(args);
  }
}

TEST_F(BenchTest, ErrorsMatchQemu) {
  for (const char* args : {
           "bench -c x a.qcow2",
           "bench -d -1 a.qcow2",
           "bench -d x a.qcow2",
           "bench -o -1 a.qcow2",
           "bench -o x a.qcow2",
           "bench -s x a.qcow2",
           "bench -S -1 a.qcow2",
           "bench -t foo a.qcow2",
           "bench -i foo a.qcow2",
           "bench --flush-interval 10 a.qcow2",
           "bench -w --flush-interval -1 a.qcow2",
           "bench -w -c 200 --flush-interval 50 a.qcow2",
           "bench --pattern 256 a.qcow2",
           "bench -w --pattern x a.qcow2",
           "bench -n -c 3 a.qcow2",
           "bench",
           "bench a.qcow2 r.raw",
           "bench -c 3 missing.qcow2",
           "bench -z a.qcow2",
           // Requests past the end fail with EIO, after the header line was printed.
           "bench -c 3 -o 100M a.qcow2",
           "bench -c 2 -s 8192 -S 16773120 r.raw",
       }) {
    expect_same_report(args);
  }
}

TEST_F(BenchTest, WritesLeaveTheSameContents) {
  // Partial-cluster allocating writes at odd offsets and sizes, some overlapping, at depth 64.
  for (const char* opts : {"-c 3000 -d 64 -s 3000 -S 77777 --pattern 0x5a",
                           "-c 500 -d 1 -s 70000 -S 1000000 --pattern 1",
                           "-c 2000 -d 32 -s 4k -S 12k -o 2k --flush-interval 100"}) {
    sh("qemu-img create -q -f qcow2 k.qcow2 100M && qemu-img create -q -f qcow2 q.qcow2 100M");
    EXPECT_EQ(kiln(fmt::format("bench -w {} k.qcow2", opts)).status, 0) << opts;
    EXPECT_EQ(qemu(fmt::format("bench -w {} q.qcow2", opts)).status, 0) << opts;
    expect_same_content("k.qcow2", "q.qcow2");
    expect_check_clean("k.qcow2");
  }
  // Over a backing file: the copy-on-write must keep the backing data around the new bytes.
  sh("qemu-img create -q -f qcow2 -b a.qcow2 -F qcow2 k.qcow2 && "
     "qemu-img create -q -f qcow2 -b a.qcow2 -F qcow2 q.qcow2");
  const std::string opts = "-c 1000 -d 64 -s 1000 -S 33333 --pattern 2";
  EXPECT_EQ(kiln(fmt::format("bench -w {} k.qcow2", opts)).status, 0);
  EXPECT_EQ(qemu(fmt::format("bench -w {} q.qcow2", opts)).status, 0);
  expect_same_content("k.qcow2", "q.qcow2");
  expect_check_clean("k.qcow2");
}

TEST_F(BenchTest, KeepsTheQueueDepthInFlight) {
  const ToolResult raw =
      run_split(fmt::format("cd {} && KILN_IMG_BENCH_STATS=1 {} bench -c 5000 -d 64 r.raw",
                            q(dir_.path()), kKilnImg),
                path(".stderr"));
  EXPECT_EQ(raw.status, 0);
  EXPECT_EQ(raw.err, "max in flight: 64\n");
  const ToolResult one =
      run_split(fmt::format("cd {} && KILN_IMG_BENCH_STATS=1 {} bench -c 100 -d 1 a.qcow2",
                            q(dir_.path()), kKilnImg),
                path(".stderr"));
  EXPECT_EQ(one.err, "max in flight: 1\n");
}

}  // namespace
}  // namespace kiln::img::testing
