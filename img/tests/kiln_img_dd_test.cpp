// kiln-img dd against qemu-img dd: same exit codes and messages, byte-identical raw output and
// qcow2 output with the same contents and size.
#include <sys/stat.h>

#include <nlohmann/json.hpp>

#include "img/tests/img_test_util.h"

namespace kiln::img::testing {
namespace {

bool exists(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0;
}

class DdTest : public ImgToolTest {
 protected:
  void SetUp() override {
    ImgToolTest::SetUp();
    sh("qemu-img create -q -f raw in.raw 1M");
    sh("qemu-io -f raw -c 'write -P 1 0 300k' -c 'write -P 2 500k 100k' -c 'write -P 3 1000000 1' "
       "in.raw >/dev/null");
    sh("head -c 200000 /dev/urandom | dd of=in.raw bs=1000 seek=700 conv=notrunc status=none");
    sh("qemu-img convert -O qcow2 in.raw a.qcow2");
    sh("qemu-img create -q -f qcow2 -b a.qcow2 -F qcow2 top.qcow2");
    sh("qemu-io -c 'write -P 9 64k 64k' -c 'write -z 0 4k' top.qcow2 >/dev/null");
    sh("head -c 1000001 /dev/urandom > odd.raw");
  }
};

TEST_F(DdTest, OperandSetsMatchQemu) {
  // {out} is replaced by each tool's own output file name.
  const std::vector<std::string> cases = {
      "dd if=in.raw of={out}",
      "dd bs=64k count=4 skip=2 if=in.raw of={out}",
      "dd bs=1000 count=7 if=in.raw of={out}",
      "dd bs=1 count=1k skip=700k if=in.raw of={out}",
      "dd bs=64k skip=100 if=in.raw of={out}",
      "dd -O qcow2 bs=4k skip=3 if=a.qcow2 of={out}",
      "dd -f qcow2 -O qcow2 bs=1M if=top.qcow2 of={out}",
      "dd bs=3M if=top.qcow2 of={out}",
      "dd count=0 if=in.raw of={out}",
      "dd bs=4k skip=1 if=odd.raw of={out}",
      "dd -f raw bs=64k count=2 if=a.qcow2 of={out}",
      "dd -U if=in.raw of={out} bs=1k count=1",
  };
  for (const auto& c : cases) {
    const bool qcow2 = c.find("-O qcow2") != std::string::npos;
    const std::string kout = qcow2 ? "k.qcow2" : "k.raw", qout = qcow2 ? "q.qcow2" : "q.raw";
    auto replace = [&](std::string s, const std::string& out) {
      return s.replace(s.find("{out}"), 5, out);
    };
    const ToolResult k = kiln(replace(c, kout)), qm = qemu(replace(c, qout));
    EXPECT_EQ(k.status, 0) << c << "\n" << k.out << k.err;
    EXPECT_EQ(k.status, qm.status) << c << "\n" << qm.out << qm.err;
    EXPECT_EQ(k.out, qm.out) << c;
    EXPECT_EQ(k.err.empty(), qm.err.empty()) << c << "\nkiln: " << k.err << "\nqemu: " << qm.err;
    if (qcow2) {
      expect_check_clean(kout);
      auto kinfo = qemu("info --output=json " + kout), qinfo = qemu("info --output=json " + qout);
      EXPECT_EQ(nlohmann::json::parse(kinfo.out)["virtual-size"],
                nlohmann::json::parse(qinfo.out)["virtual-size"])
          << c;
      EXPECT_EQ(qemu("compare -s " + kout + " " + qout).status, 0) << c;
    } else {
      EXPECT_EQ(read_file(path(kout)), read_file(path(qout))) << c;
    }
    sh("rm -f k.raw q.raw k.qcow2 q.qcow2");
  }
}

TEST_F(DdTest, BadOperandsMatchQemu) {
  for (const char* args : {
           "dd if=in.raw of=o.raw bs=0",
           "dd if=in.raw of=o.raw bs=1x",
           "dd if=in.raw of=o.raw bs=3G",
           "dd if=in.raw of=o.raw count=-1",
           "dd if=in.raw of=o.raw skip=abc",
           "dd if=in.raw of=o.raw foo=1",
           "dd if=in.raw of=o.raw foo",
           "dd if=in.raw",
           "dd of=o.raw",
           "dd -O bogus if=in.raw of=o.raw",
           "dd if=missing.raw of=o.raw",
           "dd if=in.raw of=/nonexistent/dir/o.raw",
           "dd -f qcow2 if=in.raw of=o.raw",
           "dd -f bogus if=in.raw of=o.raw",
           "dd -x if=in.raw of=o.raw",
           "dd -O",
       }) {
    expect_same(args);
    EXPECT_FALSE(exists(path("o.raw"))) << args;
  }
  // Writing over the input (open, so locked) is refused and destroys nothing.
  const auto raw = read_file(path("in.raw")), qcow2 = read_file(path("a.qcow2"));
  for (const char* args :
       {"dd -O qcow2 if=a.qcow2 of=a.qcow2", "dd -O raw if=a.qcow2 of=a.qcow2"}) {
    expect_same(args);
    EXPECT_EQ(read_file(path("a.qcow2")), qcow2) << args;
  }
  // A deliberate difference: qemu-img lets a raw input be its own output and zeroes it; kiln-img
  // keeps the input's read lock, so the create is refused and the data survives.
  auto r = kiln("dd if=in.raw of=in.raw");
  EXPECT_EQ(r.status, 1) << r.out << r.err;
  EXPECT_NE(r.err.find("lock"), std::string::npos) << r.err;
  EXPECT_EQ(read_file(path("in.raw")), raw);
}

}  // namespace
}  // namespace kiln::img::testing
