// kiln-img rebase against qemu-img rebase: the same rebase by each tool leaves images with the
// same contents and the same backing file in their headers; safe mode keeps the guest's view.
#include <nlohmann/json.hpp>

#include "img/tests/img_test_util.h"

namespace kiln::img::testing {
namespace {

class RebaseTest : public ImgToolTest {
 protected:
  void SetUp() override {
    ImgToolTest::SetUp();
    sh("mkdir src");
    sh("qemu-img create -q -f qcow2 src/base.qcow2 1M");
    sh("qemu-io -c 'write -P 1 0 600k' -c 'write -P 9 900k 8k' src/base.qcow2 >/dev/null");
    // A new backing file that agrees with the old one only in places.
    sh("qemu-img create -q -f qcow2 src/nb.qcow2 1M");
    sh("qemu-io -c 'write -P 1 0 300k' -c 'write -P 2 300k 1k' -c 'write -P 1 301k 299k' "
       "src/nb.qcow2 >/dev/null");
    sh("qemu-img convert -O raw src/nb.qcow2 src/nb.raw");
    sh("qemu-img create -q -f qcow2 src/small.qcow2 256k");
    sh("qemu-io -c 'write -P 1 0 256k' src/small.qcow2 >/dev/null");
    sh("qemu-img create -q -f qcow2 src/big.qcow2 2M");
    sh("qemu-io -c 'write -P 8 0 2M' src/big.qcow2 >/dev/null");
    sh("qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 src/top.qcow2");
    sh("qemu-io -c 'write -P 4 64k 64k' -c 'write -z 500k 4k' -c 'write -P 5 700k 1k' "
       "src/top.qcow2 >/dev/null");
    sh("qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=512 -b base.qcow2 -F qcow2 "
       "src/v2.qcow2 2M");
    sh("qemu-io -c 'write -P 6 10k 3k' -c 'write -P 7 1500k 1k' src/v2.qcow2 >/dev/null");
  }
  struct Case {
    std::string args;  // {d}: the tool's own copy of src/
    std::string image;
    bool keeps_content;  // safe mode: the guest sees the same disk afterwards
  };
  void rebase_both(const Case& c) {
    sh("rm -rf k q before.raw && cp -r src k && cp -r src q");
    sh(fmt::format("qemu-img convert -U -O raw src/{} before.raw", c.image));
    auto args = [&](const std::string& d) {
      std::string s = c.args;
      for (size_t p; (p = s.find("{d}")) != std::string::npos;) s.replace(p, 3, d);
      return s;
    };
    const ToolResult k = kiln(args("k")), qm = qemu(args("q"));
    EXPECT_EQ(k.status, qm.status) << args("k") << "\n" << k.out << k.err << "\n" << qm.err;
    EXPECT_EQ(without_progress(k.out), without_progress(qm.out)) << c.args;
    EXPECT_EQ(k.err.empty(), qm.err.empty()) << c.args << "\n" << k.err << "\n" << qm.err;
    const std::string ki = "k/" + c.image, qi = "q/" + c.image;
    auto kinfo = nlohmann::json::parse(qemu("info -U --output=json " + ki).out);
    auto qinfo = nlohmann::json::parse(qemu("info -U --output=json " + qi).out);
    for (const char* key : {"backing-filename", "backing-filename-format"}) {
      EXPECT_EQ(kinfo.value(key, ""), qinfo.value(key, "")) << c.args << " " << key;
    }
    // Compare through the chains each header now names (unsafe rebases may name missing files).
    if (qemu("info --backing-chain " + qi).status == 0) {
      expect_check_clean(ki);
      expect_same_content(ki, qi);
      if (c.keeps_content) expect_same_content(ki, "before.raw");
    }
  }
};

TEST_F(RebaseTest, CasesMatchQemu) {
  const std::vector<Case> cases = {
      {"rebase -b nb.qcow2 -F qcow2 {d}/top.qcow2", "top.qcow2", true},
      {"rebase -b nb.raw -F raw {d}/top.qcow2", "top.qcow2", true},
      {"rebase -b '' {d}/top.qcow2", "top.qcow2", true},
      {"rebase -b small.qcow2 -F qcow2 {d}/top.qcow2", "top.qcow2", true},
      {"rebase -b big.qcow2 -F qcow2 {d}/v2.qcow2", "v2.qcow2", true},
      {"rebase -p -b nb.qcow2 -F qcow2 {d}/v2.qcow2", "v2.qcow2", true},
      {"rebase -q -b '' {d}/v2.qcow2", "v2.qcow2", true},
      {"rebase -u -b nb.qcow2 -F qcow2 {d}/top.qcow2", "top.qcow2", false},
      {"rebase -u {d}/top.qcow2", "top.qcow2", false},
      {"rebase -u -b gone.qcow2 -F qcow2 {d}/top.qcow2", "top.qcow2", false},
      {"rebase -b base.qcow2 -F qcow2 {d}/nb.qcow2", "nb.qcow2", true},
      // Without -F the data is copied, then the header change is refused.
      {"rebase -b nb.qcow2 {d}/top.qcow2", "top.qcow2", true},
  };
  for (const auto& c : cases) rebase_both(c);
}

TEST_F(RebaseTest, UnsafeWorksWithoutTheOldBackingFile) {
  sh("cp -r src k && cp -r src q && rm k/base.qcow2 q/base.qcow2");
  expect_same("rebase -b nb.qcow2 -F qcow2 k/top.qcow2");  // safe mode needs the old file
  expect_same("rebase -u -b nb.qcow2 -F qcow2 k/top.qcow2");
  expect_same("rebase -u -b nb.qcow2 -F qcow2 q/top.qcow2");
  expect_same_content("k/top.qcow2", "q/top.qcow2");
  expect_check_clean("k/top.qcow2");
}

TEST_F(RebaseTest, ErrorsMatchQemu) {
  for (const char* args : {
           "rebase",
           "rebase src/top.qcow2",
           "rebase -F qcow2 src/top.qcow2",
           "rebase -b nb.qcow2 -F qcow2 src/top.qcow2 src/nb.qcow2",
           "rebase -b missing.qcow2 -F qcow2 src/top.qcow2",
           "rebase -b nb.qcow2 -F bogus src/top.qcow2",
           "rebase -b nb.qcow2 -F qcow2 missing.qcow2",
           "rebase -b nb.qcow2 -F qcow2 -f bogus src/top.qcow2",
           "rebase -x -b nb.qcow2 src/top.qcow2",
           "rebase -T bogus -b nb.qcow2 -F qcow2 src/top.qcow2",
           "rebase src/top.qcow2 -b",
       }) {
    expect_same(args);
  }
  sh("cp -r src k");
  expect_same_content("src/top.qcow2", "k/top.qcow2");
}

}  // namespace
}  // namespace kiln::img::testing
