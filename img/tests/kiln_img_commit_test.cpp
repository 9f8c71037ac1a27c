// kiln-img commit against qemu-img commit: the same chains committed by each tool end up with the
// same contents in every layer, kiln's images pass qemu-img check, and errors match.
#include <nlohmann/json.hpp>

#include "img/tests/img_test_util.h"

namespace kiln::img::testing {
namespace {

class CommitTest : public ImgToolTest {
 protected:
  // Builds a chain in src/ (base <- mid <- top) with data, zero clusters and partial clusters.
  void make_chain(const std::string& base_opts, const std::string& top_opts,
                  const std::string& base_fmt = "qcow2") {
    sh("rm -rf src k q && mkdir src");
    if (base_fmt == "raw") {
      sh("qemu-img create -q -f raw src/base.img 2M");
      sh("qemu-io -f raw -c 'write -P 1 0 1M' -c 'write -P 2 1500k 100k' src/base.img "
         ">/dev/null");
    } else {
      sh(fmt::format("qemu-img create -q -f qcow2 {} src/base.img 2M", base_opts));
      sh("qemu-io -c 'write -P 1 0 1M' -c 'write -P 2 1500k 100k' src/base.img >/dev/null");
    }
    sh(fmt::format("qemu-img create -q -f qcow2 {} -b base.img -F {} src/mid.qcow2", top_opts,
                   base_fmt));
    sh("qemu-io -c 'write -P 3 100k 50k' -c 'write -z 300k 128k' src/mid.qcow2 >/dev/null");
    sh(fmt::format("qemu-img create -q -f qcow2 {} -b mid.qcow2 -F qcow2 src/top.qcow2", top_opts));
    sh("qemu-io -c 'write -P 4 120k 4k' -c 'write -P 5 1000k 70k' -c 'write -z 1600k 64k' "
       "-c 'write -P 6 2000k 48k' src/top.qcow2 >/dev/null");
    sh("cp -r src k && cp -r src q");
  }
  // Same arguments for both tools on their own copy ({d} = k or q).
  void commit_both(const std::string& args_template) {
    auto args = [&](const std::string& d) {
      std::string s = args_template;
      for (size_t p; (p = s.find("{d}")) != std::string::npos;) s.replace(p, 3, d);
      return s;
    };
    const ToolResult k = kiln(args("k")), qm = qemu(args("q"));
    EXPECT_EQ(k.status, 0) << args("k") << "\n" << k.out << k.err;
    EXPECT_EQ(k.status, qm.status) << args("q") << "\n" << qm.out << qm.err;
    EXPECT_EQ(without_progress(k.out), without_progress(qm.out)) << args_template;
    if (args_template.find("-p") != std::string::npos) {
      EXPECT_EQ(k.out.rfind("    (100.00/100%)\r\n"), k.out.find("    (100.00/100%)\r\n")) << k.out;
      EXPECT_NE(k.out.find("    (100.00/100%)\r\n"), std::string::npos) << k.out;
    }
    EXPECT_EQ(k.err.empty(), qm.err.empty()) << k.err << "\n" << qm.err;
  }
  // Every layer reads the same in both copies and kiln's qcow2 files are consistent.
  void expect_same_layers() {
    for (const char* f : {"top.qcow2", "mid.qcow2", "base.img"}) {
      expect_same_content(std::string("k/") + f, std::string("q/") + f);
      if (std::string(f) != "base.img" ||
          qemu("info k/base.img").out.find("qcow2") != std::string::npos) {
        expect_check_clean(std::string("k/") + f);
      }
    }
  }
  // True when the image maps no data of its own.
  bool empty_top(const std::string& img) {
    auto j = nlohmann::json::parse(qemu("map --output=json " + img).out);
    for (const auto& e : j) {
      if (e["depth"] == 0 && e["present"] == true) return false;
    }
    return true;
  }
};

TEST_F(CommitTest, CommitsIntoBackingAndEmptiesTop) {
  make_chain("", "");
  const std::string before = path("before.raw");
  sh("qemu-img convert -O raw src/top.qcow2 before.raw");
  commit_both("commit {d}/top.qcow2");
  expect_same_layers();
  EXPECT_TRUE(empty_top("k/top.qcow2"));
  EXPECT_TRUE(empty_top("q/top.qcow2"));
  // The guest still sees the same disk, and the mid layer now holds it.
  expect_same_content("k/top.qcow2", "before.raw");
  expect_same_content("k/mid.qcow2", "before.raw");
}

TEST_F(CommitTest, KeepTopWithD) {
  make_chain("-o cluster_size=4k", "-o cluster_size=512");
  commit_both("commit -d -q {d}/top.qcow2");
  expect_same_layers();
  EXPECT_FALSE(empty_top("k/top.qcow2"));
}

TEST_F(CommitTest, CommitIntoDeeperBase) {
  make_chain("-o compat=0.10", "-o compat=0.10");
  sh("qemu-img convert -O raw src/top.qcow2 before.raw");
  commit_both("commit -b base.img {d}/top.qcow2");
  expect_same_layers();
  expect_same_content("k/base.img", "before.raw");
  EXPECT_FALSE(empty_top("k/top.qcow2"));  // -b implies -d
}

TEST_F(CommitTest, RawBaseGetsTheSameBytes) {
  make_chain("", "", "raw");
  commit_both("commit -b base.img {d}/top.qcow2");
  expect_same_layers();
  EXPECT_EQ(read_file(path("k/base.img")), read_file(path("q/base.img")));
}

TEST_F(CommitTest, GrowsAShorterBase) {
  sh("rm -rf src k q && mkdir src && qemu-img create -q -f qcow2 src/base.img 1M");
  sh("qemu-io -c 'write -P 1 0 1M' src/base.img >/dev/null");
  sh("qemu-img create -q -f qcow2 -b base.img -F qcow2 src/top.qcow2 3M");
  sh("qemu-io -c 'write -P 7 2M 100k' src/top.qcow2 >/dev/null");
  sh("cp -r src k && cp -r src q");
  commit_both("commit -p {d}/top.qcow2");
  expect_same_content("k/base.img", "q/base.img");
  expect_same_content("k/top.qcow2", "q/top.qcow2");
  expect_check_clean("k/base.img");
  expect_check_clean("k/top.qcow2");
}

// Partial-cluster writes into compressed clusters whose host offsets are not sector aligned
// (qemu packs 4 KiB compressed clusters byte by byte): the copy-on-write must keep the rest.
TEST_F(CommitTest, PartialWritesIntoCompressedBase) {
  for (const char* ctype : {"zlib", "zstd"}) {
    sh("rm -rf src k q && mkdir src");
    sh(
        fmt::format("qemu-img create -q -f qcow2 -o cluster_size=4k src/b0.qcow2 2M && "
                    "qemu-io -c 'write -P 1 0 1M' -c 'write -P 3 1M 1M' src/b0.qcow2 >/dev/null && "
                    "qemu-img convert -c -O qcow2 -o cluster_size=4k,compression_type={} "
                    "src/b0.qcow2 src/base.img",
                    ctype));
    sh("qemu-img create -q -f qcow2 -o cluster_size=512 -b base.img -F qcow2 src/top.qcow2");
    sh("qemu-io -c 'write -P 2 1000 5000' -c 'write -z 100k 3000' -c 'write -P 4 1500k 700' "
       "src/top.qcow2 >/dev/null");
    sh("qemu-img convert -O raw src/top.qcow2 before.raw && cp -r src k && cp -r src q");
    commit_both("commit {d}/top.qcow2");
    expect_same_content("k/base.img", "q/base.img");
    expect_same_content("k/base.img", "before.raw");
    expect_check_clean("k/base.img");
    expect_check_clean("k/top.qcow2");
  }
}

TEST_F(CommitTest, ErrorsMatchQemu) {
  make_chain("", "");
  for (const char* args : {
           "commit",
           "commit src/top.qcow2 src/mid.qcow2",
           "commit src/base.img",
           "commit -b nope.qcow2 src/top.qcow2",
           "commit -b top.qcow2 src/top.qcow2",
           "commit missing.qcow2",
           "commit -f raw src/top.qcow2",
           "commit -f bogus src/top.qcow2",
           "commit -t bogus src/top.qcow2",
           "commit -x src/top.qcow2",
           "commit src/top.qcow2 -b",
       }) {
    expect_same(args);
  }
  // Nothing was changed by the failed attempts.
  expect_same_content("src/top.qcow2", "k/top.qcow2");
  expect_same_content("src/mid.qcow2", "k/mid.qcow2");
  // A missing backing file is an open error.
  sh("rm src/base.img");
  expect_same("commit src/top.qcow2");
  // An image another process writes is refused.
  block::qcow2::OpenOptions o;
  o.read_only = false;
  auto writer = block::qcow2::Image::open(path("k/mid.qcow2"), o);
  auto r = kiln("commit k/top.qcow2");
  EXPECT_EQ(r.status, 1) << r.out << r.err;
  EXPECT_NE(r.err.find("lock"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace kiln::img::testing
