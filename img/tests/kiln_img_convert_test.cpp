// kiln-img convert's parallel requests (-m, -W) and backing files (-B, -F, -o backing_file):
// contents checked with qemu-img compare and check, errors against qemu-img's.
#include <nlohmann/json.hpp>

#include "img/tests/img_test_util.h"

namespace kiln::img::testing {
namespace {

class ConvertTest : public ImgToolTest {
 protected:
  void SetUp() override {
    ImgToolTest::SetUp();
    // Data in most 1 MiB chunks (convert's unit of work), holes and zeros between, and a tail
    // that is not a whole cluster.
    sh("qemu-img create -q -f raw src.raw 24M && truncate -s 25165312 src.raw");
    sh("qemu-io -f raw -c 'write -P 0x11 0 3M' -c 'write -P 0x22 5M 64k' "
       "-c 'write -P 0x33 7340000 1M' -c 'write -P 0 9M 1M' -c 'write -P 0x44 13M 5M' "
       "-c 'write -P 0x55 25165000 312' src.raw >/dev/null");
    sh("head -c 2M /dev/urandom | dd of=src.raw bs=1M seek=20 conv=notrunc status=none");
  }

  // Guest ranges the top image itself maps (depth 0), as qemu-img map reports them.
  std::vector<std::pair<uint64_t, uint64_t>> top_ranges(const std::string& img) {
    const auto json = nlohmann::json::parse(sh(fmt::format("qemu-img map --output=json {}", img)));
    std::vector<std::pair<uint64_t, uint64_t>> ranges;
    for (const auto& e : json) {
      if (e["depth"] == 0 && e["present"] == true) ranges.emplace_back(e["start"], e["length"]);
    }
    return ranges;
  }

  // Both tools' stderr without the program name: qemu-img's message text is the reference.
  void expect_same_error(const std::string& args) {
    const ToolResult k = kiln(args), qm = qemu(args);
    EXPECT_EQ(k.status, qm.status) << args;
    EXPECT_NE(k.status, 0) << args;
    ASSERT_EQ(k.err.rfind("kiln-img: ", 0), 0u) << k.err;
    ASSERT_EQ(qm.err.rfind("qemu-img: ", 0), 0u) << qm.err;
    EXPECT_EQ(k.err.substr(10), qm.err.substr(10)) << args;
  }
};

TEST_F(ConvertTest, ParallelRequestsKeepContents) {
  for (const char* flags : {"-m 1", "-m 16", "-W", "-m 16 -W", "-m 3 -W -c"}) {
    SCOPED_TRACE(flags);
    ASSERT_EQ(kiln(fmt::format("convert {} -O qcow2 src.raw k.qcow2", flags)).status, 0);
    expect_same_content("src.raw", "k.qcow2");
    expect_check_clean("k.qcow2");
    if (std::string(flags).find("-c") != std::string::npos) continue;
    ASSERT_EQ(kiln(fmt::format("convert {} -O raw k.qcow2 k.raw", flags)).status, 0);
    sh("cmp src.raw k.raw");
  }
}

// Hole chunks take no buffer, so readers run far ahead through a long hole; a run of holes
// longer than the 1024 chunks they may be ahead of the writer, and data after it, read back.
TEST_F(ConvertTest, LongHoleRunsBetweenData) {
  sh("qemu-img create -q -f raw holes.raw 1040M");
  sh("qemu-io -f raw -c 'write -P 0x61 0 5M' -c 'write -P 0x62 1036M 3M' "
     "-c 'write -P 0x63 1039M 4k' holes.raw >/dev/null");
  for (const char* flags : {"-m 1", "-m 16", "-m 16 -W"}) {
    SCOPED_TRACE(flags);
    sh("rm -f k.qcow2 k.raw");
    ASSERT_EQ(kiln(fmt::format("convert {} -O qcow2 holes.raw k.qcow2", flags)).status, 0);
    expect_same_content("holes.raw", "k.qcow2");
    ASSERT_EQ(kiln(fmt::format("convert {} -O raw k.qcow2 k.raw", flags)).status, 0);
    sh("qemu-img compare -q -f raw -F raw holes.raw k.raw");
  }
  sh("qemu-img convert -O qcow2 holes.raw q.qcow2 && cmp k.qcow2 q.qcow2");
}

TEST_F(ConvertTest, ParallelQcow2TargetHasQemuLayout) {
  // One writer in guest order: clusters land where qemu-img puts them, whatever -m says.
  sh("qemu-img convert -O qcow2 src.raw q.qcow2");
  const std::string qemu_map = sh("qemu-img map --output=json q.qcow2");
  ASSERT_EQ(kiln("convert -m 16 -O qcow2 src.raw k.qcow2").status, 0);
  EXPECT_EQ(sh("qemu-img map --output=json k.qcow2"), qemu_map);
}

TEST_F(ConvertTest, CoroutineCountOutOfRangeFailsLikeQemu) {
  for (const char* m : {"0", "17", "-1", "abc"}) {
    expect_same_error(fmt::format("convert -m {} -O qcow2 src.raw x.qcow2", m));
  }
  const ToolResult k = kiln("convert -m 17 -O raw src.raw x.raw");
  EXPECT_EQ(k.err,
            "kiln-img: Invalid number of coroutines. Allowed number of coroutines is between 1 "
            "and 16\n");
}

TEST_F(ConvertTest, BackingFileHoldsWhatTheSourceShares) {
  // The base is the source with three changes: new data, zeros over data, and data in a hole.
  sh("qemu-img convert -O qcow2 src.raw base.qcow2 && cp src.raw mod.raw");
  sh("qemu-io -f raw -c 'write -P 0x66 64k 128k' -c 'write -P 0 13M 64k' "
     "-c 'write -P 0x77 11M 4k' mod.raw >/dev/null");
  for (const char* how : {"-B base.qcow2 -F qcow2", "-m 1 -B base.qcow2 -F qcow2",
                          "-o backing_file=base.qcow2,backing_fmt=qcow2"}) {
    SCOPED_TRACE(how);
    ASSERT_EQ(kiln(fmt::format("convert {} -O qcow2 mod.raw t.qcow2", how)).status, 0);
    const auto info = nlohmann::json::parse(sh("qemu-img info --output=json t.qcow2"));
    EXPECT_EQ(info["backing-filename"], "base.qcow2");
    EXPECT_EQ(info["backing-filename-format"], "qcow2");
    expect_same_content("mod.raw", "t.qcow2");
    expect_check_clean("t.qcow2");
    // Only the changed clusters are in the top image; the rest reads through to the base.
    const std::vector<std::pair<uint64_t, uint64_t>> want = {
        {64 << 10, 128 << 10}, {11 << 20, 64 << 10}, {13 << 20, 64 << 10}};
    EXPECT_EQ(top_ranges("t.qcow2"), want);
  }
}

TEST_F(ConvertTest, BackingFileErrorsMatchQemu) {
  expect_same_error("convert -B missing.qcow2 -F qcow2 -O qcow2 src.raw t.qcow2");
  expect_same_error("convert -B src.raw -O qcow2 src.raw t.qcow2");
  expect_same_error("convert -B src.raw -F raw -O raw src.raw t.raw");
}

// -t/-T none, off and directsync open target and source with O_DIRECT (the qcow2 unit tests check
// the flag); the files must come out byte for byte as through the page cache.
TEST_F(ConvertTest, CacheNoneWritesWhatThePageCacheWrites) {
  sh("qemu-img convert -O qcow2 -o cluster_size=512 src.raw small.qcow2");
  for (const char* args : {"-O raw src.raw", "-O qcow2 src.raw", "-O qcow2 -c src.raw",
                           "-O qcow2 -o cluster_size=512 src.raw", "-O raw small.qcow2",
                           "-W -m 4 -O raw small.qcow2", "-O qcow2 -c small.qcow2"}) {
    SCOPED_TRACE(args);
    for (const char* modes : {"-t none -T none", "-t directsync -T off"}) {
      ASSERT_EQ(kiln(fmt::format("convert {} {} direct.img", modes, args)).status, 0) << modes;
      ASSERT_EQ(kiln(fmt::format("convert {} buffered.img", args)).status, 0);
      sh("cmp direct.img buffered.img");
      expect_same_content("src.raw", "direct.img");
    }
  }
  expect_same_error("convert -t bogus src.raw t.raw");
  expect_same_error("convert -T writeahead src.raw t.raw");
}

TEST_F(ConvertTest, ParallelReadOfChainWithCompressedClusters) {
  sh("qemu-img convert -c -O qcow2 -o cluster_size=4k src.raw comp.qcow2");
  sh("qemu-img create -q -f qcow2 -b comp.qcow2 -F qcow2 top.qcow2");
  sh("qemu-io -c 'write -P 0x88 1M 300k' -c 'write -z 14M 1M' -c 'write -P 0x99 22M 8k' "
     "top.qcow2 >/dev/null");
  sh("qemu-img convert -O raw top.qcow2 want.raw");
  for (const char* flags : {"-m 16", "-m 16 -W", "-m 2"}) {
    SCOPED_TRACE(flags);
    ASSERT_EQ(kiln(fmt::format("convert {} -O raw top.qcow2 k.raw", flags)).status, 0);
    sh("cmp want.raw k.raw");
    ASSERT_EQ(kiln(fmt::format("convert {} -c -O qcow2 top.qcow2 k.qcow2", flags)).status, 0);
    expect_same_content("want.raw", "k.qcow2");
    expect_check_clean("k.qcow2");
  }
}

// convert writes qemu-img's file byte for byte. With -c: blobs packed byte by byte (running
// on into the next cluster), a cluster compressed whenever it shrinks at all, the short last
// cluster compressed too, every zero cluster left out unless -S 0, the file end on a sector
// boundary.
TEST_F(ConvertTest, TargetIsQemusByteForByte) {
  // Clusters that compress to ~20 KB (three blobs span two clusters) and clusters that shrink
  // by 9 bytes to 4 KB, then the fixture's mix of patterns, zeros, random data and short tail.
  sh("for i in $(seq 8); do head -c 20000 /dev/urandom; head -c 45536 /dev/zero; done >mix.raw");
  sh("for n in 100 511 513 4000; do head -c $((65536 - n)) /dev/urandom; head -c $n /dev/zero; "
     "done >>mix.raw && cat src.raw >>mix.raw");
  for (const char* options :
       {"-o cluster_size=64k", "-o compression_type=zstd", "-o cluster_size=4k,refcount_bits=1",
        "-o cluster_size=512,refcount_bits=8", "-S 0 -o cluster_size=512", "-o compat=0.10"}) {
    SCOPED_TRACE(options);
    sh("rm -f k.qcow2 q.qcow2");
    ASSERT_EQ(kiln(fmt::format("convert -c {} -O qcow2 mix.raw k.qcow2", options)).status, 0);
    ASSERT_EQ(qemu(fmt::format("convert -c {} -O qcow2 mix.raw q.qcow2", options)).status, 0);
    sh("cmp k.qcow2 q.qcow2");
    expect_check_clean("k.qcow2");
  }
  // And without -c: the same layout of plain clusters, and the same raw file.
  for (const char* args : {"-O qcow2 mix.raw k.out", "-O qcow2 -o cluster_size=4k mix.raw k.out",
                           "-O raw q.qcow2 k.out"}) {
    SCOPED_TRACE(args);
    sh("rm -f k.out q.out");
    ASSERT_EQ(kiln(fmt::format("convert {}", args)).status, 0);
    std::string theirs = args;
    theirs.replace(theirs.find("k.out"), 5, "q.out");
    ASSERT_EQ(qemu(fmt::format("convert {}", theirs)).status, 0);
    sh("cmp k.out q.out");
  }
}

// -S: zero runs (written zeros, not holes) shorter than the size are written as data, longer
// ones are left sparse; 0 writes every byte, so the target is fully allocated. Both tools'
// targets map alike. Bad sizes fail with qemu-img's message.
TEST_F(ConvertTest, SparseSizeAsQemu) {
  sh("qemu-img create -q -f raw z.raw 6M");
  sh("qemu-io -f raw -c 'write -P 0x66 0 1M' -c 'write -P 0 1M 512k' -c 'write -P 0x77 1536k 512k' "
     "-c 'write -P 0 2M 2M' -c 'write -P 0x88 4M 1M' z.raw >/dev/null");
  auto map = [&](const std::string& file, const char* fmt) {
    return sh(
        fmt::format("qemu-img map --output=json -f {} {} | sed 's/\"offset\".*//'", fmt, file));
  };
  for (const char* flags : {"", "-S 0", "-S 1M", "-S 16M -m 1", "-S 0 -W"}) {
    for (const char* out : {"raw", "qcow2"}) {
      for (const char* src : {"z.raw", "src.raw"}) {
        SCOPED_TRACE(fmt::format("{} -O {} {}", flags, out, src));
        const bool written_zeros_only = std::string(src) == "z.raw";
        const bool in_order_qcow2 = std::string(flags).find("-W") != std::string::npos;
        if ((in_order_qcow2 && out == std::string("qcow2")) ||
            (!written_zeros_only && std::string(flags).find("-S 0") == std::string::npos)) {
          continue;  // holes in src.raw: qemu-img aligns the runs around them its own way
        }
        const std::string args = fmt::format("convert {} -O {} {} t.{}", flags, out, src, out);
        ASSERT_EQ(qemu(args).status, 0);
        sh(fmt::format("mv t.{} q.{}", out, out));
        ASSERT_EQ(kiln(args).status, 0);
        expect_same_content(src, fmt::format("t.{}", out));
        EXPECT_EQ(map(fmt::format("t.{}", out), out), map(fmt::format("q.{}", out), out));
      }
    }
  }
  // The 512 KiB zero run is data under -S 1M and a hole by default.
  ASSERT_EQ(kiln("convert -S 1M -O raw z.raw s.raw").status, 0);
  EXPECT_NE(map("s.raw", "raw").find("\"start\": 0, \"length\": 2097152"), std::string::npos);
  expect_same_error("convert -S 1000 -O raw src.raw x.raw");
  expect_same_error("convert -S 32M -O raw src.raw x.raw");
  EXPECT_EQ(kiln("convert -S abc -O raw src.raw x.raw").status, 1);
}

// -n writes into an existing, larger target full of other data: afterwards the source's range
// reads as the source (zeros included), the rest is untouched, and the qcow2 map is qemu-img's.
TEST_F(ConvertTest, NoCreateOverwritesAnExistingTarget) {
  for (const char* out : {"raw", "qcow2"}) {
    for (const char* tool : {"k", "q"}) {
      SCOPED_TRACE(fmt::format("{} {}", out, tool));
      const std::string target = fmt::format("{}.{}", tool, out);
      sh(fmt::format("qemu-img create -q -f {} {} 32M", out, target));
      sh(fmt::format("qemu-io -f {} -c 'write -P 0x99 0 32M' {} >/dev/null", out, target));
      const std::string args = fmt::format("convert -n -m 4 -O {} src.raw {}", out, target);
      ASSERT_EQ((tool == std::string("k") ? kiln(args) : qemu(args)).status, 0);
      sh(fmt::format(
          "qemu-img convert -f {} -O raw {} flat.raw && cmp -n 25165312 src.raw flat.raw", out,
          target));
      // qemu-io exits 1 when the pattern does not match.
      sh(fmt::format("qemu-io -f {} -c 'read -P 0x99 25165824 8M' {} >/dev/null", out, target));
    }
    if (out == std::string("qcow2")) {
      EXPECT_EQ(sh("qemu-img map --output=json k.qcow2"), sh("qemu-img map --output=json q.qcow2"));
      expect_check_clean("k.qcow2");
    }
  }
  expect_same_error("convert -n -O qcow2 -o cluster_size=4k src.raw k.qcow2");
  expect_same_error("convert -n -O raw src.raw missing.raw");
  sh("qemu-img create -q -f raw small.raw 1M");
  expect_same_error("convert -n -O raw src.raw small.raw");
}

}  // namespace
}  // namespace kiln::img::testing
