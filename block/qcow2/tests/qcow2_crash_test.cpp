// Crash consistency: a child doing allocating writes + flushes is SIGKILLed at random moments;
// afterwards qemu-img check finds no corruption (leaks are allowed) and every write that a
// completed flush covered reads back.
#include <fcntl.h>
#include <fmt/format.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <numeric>
#include <random>

#include "block/qcow2/qcow2.h"
#include "block/qcow2/tests/test_util.h"

namespace kiln::block::qcow2 {
namespace {

using testing::q;
using testing::run;
using testing::TempDir;

struct Config {
  uint32_t cluster_size;
  uint32_t refcount_bits;
};

struct Workload {
  uint64_t stride;
  std::vector<uint64_t> order;  // region index of the k-th write
  uint64_t length(uint64_t k) const { return 1000 + (k * 7919) % (stride - 1000); }
  uint8_t pattern(uint64_t k) const { return uint8_t(k % 251 + 1); }
};

Workload make_workload(const Config& c, uint64_t size, uint32_t seed) {
  Workload w;
  w.stride = 2 * c.cluster_size + 1000;
  w.order.resize(size / w.stride);
  std::iota(w.order.begin(), w.order.end(), 0);
  std::shuffle(w.order.begin(), w.order.end(), std::mt19937(seed));
  return w;
}

[[noreturn]] void child_main(const std::string& path, const Workload& w, int report_fd) {
  try {
    OpenOptions o;
    o.read_only = false;
    o.l2_cache_bytes = 1;  // minimum cache: evictions happen mid-stream
    auto image = Image::open(path, o);
    for (uint64_t k = 0; k < w.order.size(); ++k) {
      std::vector<uint8_t> data(w.length(k), w.pattern(k));
      image->write(w.order[k] * w.stride + 500, data);
      if (k % 4 == 3) {
        image->flush();
        const uint64_t acked = k + 1;
        if (::write(report_fd, &acked, sizeof acked) != sizeof acked) _exit(3);
      }
    }
  } catch (...) {
    _exit(2);
  }
  _exit(0);
}

TEST(CrashConsistency, KilledWriterLeavesConsistentImage) {
  testing::require_qemu_tools();
  const Config configs[] = {{4096, 16}, {512, 64}, {65536, 1}};
  constexpr uint64_t kSize = 24ull << 20;
  std::mt19937 rng(1234);
  int kills_mid_write = 0;
  for (int iter = 0; iter < 30; ++iter) {
    const Config& c = configs[iter % 3];
    TempDir dir;
    const std::string img = dir / "crash.qcow2";
    CreateOptions co;
    co.size = kSize;
    co.cluster_size = c.cluster_size;
    co.refcount_bits = c.refcount_bits;
    Image::create(img, co);
    const Workload w = make_workload(c, kSize, uint32_t(iter));

    int fds[2];
    ASSERT_EQ(::pipe2(fds, O_CLOEXEC), 0);
    const pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      ::close(fds[0]);
      child_main(img, w, fds[1]);
    }
    ::close(fds[1]);
    ::usleep(2000 + rng() % 60000);
    ::kill(pid, SIGKILL);
    int status = 0;
    ::waitpid(pid, &status, 0);
    if (WIFSIGNALED(status)) ++kills_mid_write;
    uint64_t acked = 0, v;
    while (::read(fds[0], &v, sizeof v) == sizeof v) acked = v;
    ::close(fds[0]);

    auto r = run("qemu-img check " + q(img));
    EXPECT_TRUE(r.status == 0 || r.status == 3) << "iteration " << iter << "\n" << r.out;
    auto image = Image::open(img, OpenOptions{});
    for (uint64_t k = 0; k < acked; ++k) {
      std::vector<uint8_t> got(w.length(k));
      image->read(w.order[k] * w.stride + 500, got);
      ASSERT_TRUE(std::all_of(got.begin(), got.end(), [&](uint8_t b) { return b == w.pattern(k); }))
          << "iteration " << iter << " write " << k << " of " << acked << " acknowledged";
    }
  }
  EXPECT_GT(kills_mid_write, 10);  // the test must really interrupt writers
}

}  // namespace
}  // namespace kiln::block::qcow2
