// kiln-img amend against qemu-img amend: the same changes applied to copies of one image give the
// same guest contents and the same `qemu-img info`, both images stay clean, and refused changes
// fail with the same exit code and message.
#include "img/tests/img_test_util.h"

namespace kiln::img::testing {
namespace {

// An error message without the tool's name, wherever it appears.
std::string message(std::string err) {
  for (const char* tool : {"kiln-img", "qemu-img"}) {
    for (size_t pos; (pos = err.find(tool)) != std::string::npos;) err.replace(pos, 8, "TOOL");
  }
  return err;
}

class AmendTest : public ImgToolTest {
 protected:
  void SetUp() override {
    ImgToolTest::SetUp();
    sh("qemu-img create -q -f qcow2 base.qcow2 64M");
    sh("qemu-io -c 'write -P 5 0 64M' base.qcow2 >/dev/null");
    sh("qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 k.qcow2");
    // Data, zero clusters over backing data, a zero cluster with a host cluster, a snapshot.
    sh("qemu-io -c 'write -P 1 0 1M' -c 'write -z 2M 128k' -c 'write -P 2 40M 64k' "
       "-c 'write -z 40M 64k' k.qcow2 >/dev/null");
    sh("cp k.qcow2 q.qcow2");
  }
  // Info without the lines that name the file or depend on its allocation.
  std::string info(const std::string& file) {
    return sh(fmt::format("qemu-img info {} | grep -v -e '^image:' -e '^disk size:'", file));
  }
  void expect_same_amend(const std::string& opts) {
    const ToolResult k = kiln(fmt::format("amend {} k.qcow2", opts));
    const ToolResult qm = qemu(fmt::format("amend {} q.qcow2", opts));
    EXPECT_EQ(k.status, qm.status) << opts << "\nkiln: " << k.err << "\nqemu: " << qm.err;
    EXPECT_EQ(without_progress(k.out), without_progress(qm.out)) << opts;
    EXPECT_EQ(message(k.err), message(qm.err)) << opts;
    expect_check_clean("k.qcow2");
    expect_same_content("k.qcow2", "q.qcow2");
    EXPECT_EQ(info("k.qcow2"), info("q.qcow2")) << opts;
  }
};

TEST_F(AmendTest, SequenceOfChangesMatchesQemu) {
  for (const char* opts : {
           "-o refcount_bits=1",
           "-o refcount_bits=64 -p",
           "-o compat=0.10",
           "-o compat=1.1,lazy_refcounts=on",
           "-o refcount_bits=8",
           "-o lazy_refcounts=off",
           "-o size=32M",  // drops the data at 40M; growing again must not show the backing's
           "-q -o size=128M",
           "-o refcount_bits=16",
           "-o compat=v2",
           "-o compat=v3",
           "-o lazy_refcounts=on",
           "-f qcow2 -t none -o compat=0.10",
           "-o compat=1.1 --force",
       }) {
    expect_same_amend(opts);
  }
}

TEST_F(AmendTest, DowngradeExpandsZeroClustersWithoutBacking) {
  sh("qemu-img create -q -f qcow2 k.qcow2 8M");
  sh("qemu-io -c 'write -P 3 0 256k' -c 'write -z 64k 64k' -c 'write -z 1M 1M' k.qcow2 "
     ">/dev/null");
  sh("cp k.qcow2 q.qcow2");
  expect_same_amend("-o compat=0.10");
  EXPECT_NE(info("k.qcow2").find("compat: 0.10"), std::string::npos);
}

TEST_F(AmendTest, RefusalsMatchQemu) {
  for (const char* opts : {
           "-o compat=0.10,refcount_bits=64",
           "-o compat=0.10,lazy_refcounts=on",
           "-o refcount_bits=3",
           "-o refcount_bits=128",
           "-o compat=2",
           "-o lazy_refcounts=x",
           "-o backing_file=base.qcow2",
           "-o backing_fmt=raw",
           "-o cluster_size=4k",
           "-o compression_type=zstd",
           "-o preallocation=metadata",
           "-o extended_l2=on",
           "-o foo=bar",
           "-o data_file=x",
           "-o size=1000",
           "-t bogus -o compat=1.1",
       }) {
    expect_same_amend(opts);
  }
  // A width change needs v3; a v2 image keeps 16 bits.
  expect_same_amend("-o compat=0.10");
  expect_same_amend("-o refcount_bits=8");
  sh("qemu-img create -q -f qcow2 -o refcount_bits=8 r8.qcow2 1M");
  sh("qemu-img create -q -f qcow2 -o extended_l2=on xl2.qcow2 1M");
  for (const char* args :
       {"amend -o compat=0.10 r8.qcow2", "amend -o compat=0.10 xl2.qcow2", "amend k.qcow2",
        "amend -o compat=1.1", "amend -o compat=1.1 missing.qcow2",
        "amend -f raw -o size=1M base.qcow2"}) {
    const ToolResult k = kiln(args), qm = qemu(args);
    EXPECT_EQ(k.status, qm.status) << args << "\nkiln: " << k.err << "\nqemu: " << qm.err;
    EXPECT_EQ(message(k.err), message(qm.err)) << args;
  }
}

// "-o help" lists options as qemu-img does: same heading, and each option kiln lists is a line
// of qemu-img's list word for word (kiln leaves out what it does not implement: encryption,
// external data files). Formats with no list fail alike.
TEST_F(AmendTest, OptionHelpIsQemusListOfWhatKilnImplements) {
  sh("qemu-img create -q -f raw r.raw 1M");
  // qemu-img lists raw's preallocation (its file protocol's) only when given a file name.
  const std::pair<const char*, const char*> cases[] = {
      {"create -f qcow2 -o help", "create -f qcow2 -o help"},
      {"create -f raw -o ?", "create -f raw -o ? x.raw"},
      {"amend -f qcow2 -o help", "amend -f qcow2 -o help"},
      {"amend -o help k.qcow2", "amend -o help k.qcow2"},
      {"create -f qcow2 -o size=1M,help", "create -f qcow2 -o size=1M,help"}};
  for (const auto& [kiln_args, qemu_args] : cases) {
    SCOPED_TRACE(kiln_args);
    const ToolResult k = kiln(kiln_args), qm = qemu(qemu_args);
    ASSERT_EQ(k.status, 0) << k.err;
    ASSERT_EQ(qm.status, 0) << qm.err;
    const std::string heading = k.out.substr(0, k.out.find('\n') + 1);
    if (qemu_args == std::string(kiln_args)) {
      EXPECT_EQ(qm.out.rfind(heading, 0), 0u) << qm.out;
    }
    int options = 0;
    for (size_t pos = heading.size(), end; pos < k.out.size(); pos = end + 1) {
      end = k.out.find('\n', pos);
      const std::string line = k.out.substr(pos, end - pos + 1);
      EXPECT_NE(qm.out.find(line), std::string::npos) << line;
      options++;
    }
    EXPECT_GE(options, 2);
  }
  for (const char* args : {"create -f foo -o help", "amend -o help r.raw", "amend -o help"}) {
    SCOPED_TRACE(args);
    EXPECT_EQ(kiln(args).status, 1);
    EXPECT_EQ(qemu(args).status, 1);
  }
}

}  // namespace
}  // namespace kiln::img::testing
