// Image::try_read_cached and the device's inline reads: a read is answered on the caller's thread
// only when neither metadata nor data has to come from the disk, and only for plain data;
// everything else goes to read() on a worker, with the same result.
#include <fcntl.h>
#include <fmt/format.h>
#include <sys/mman.h>
#include <unistd.h>

#include <future>
#include <thread>

#include "block/qcow2/qcow2.h"
#include "block/qcow2/qcow2_device.h"
#include "block/qcow2/tests/test_util.h"

namespace kiln::block::qcow2 {
namespace {

using testing::must;
using testing::q;
using testing::TempDir;

class CachedReadTest : public ::testing::Test {
 protected:
  void SetUp() override {
    testing::require_qemu_tools();
    img_ = dir_ / "c.qcow2";
    // 64 KiB clusters: two of data (back to back in the file), one zero cluster, then
    // unallocated ones.
    must(fmt::format("qemu-img create -q -f qcow2 {} 1M", q(img_)));
    must(fmt::format("qemu-io -c 'write -P 0x42 0 128k' -c 'write -z 128k 64k' {} >/dev/null",
                     q(img_)));
  }

  std::unique_ptr<Image> open(CacheMode cache = CacheMode::kWriteback) {
    OpenOptions o;
    o.cache = cache;
    return Image::open(img_, o);
  }

  // Writes back and drops the file's pages from the page cache, and checks with mincore that
  // the page at `offset` is gone.
  void evict_page_cache(uint64_t offset) {
    const int fd = ::open(img_.c_str(), O_RDONLY);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::fsync(fd), 0);
    ASSERT_EQ(::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED), 0);
    const size_t page = size_t(::sysconf(_SC_PAGESIZE));
    void* map = ::mmap(nullptr, page, PROT_READ, MAP_SHARED, fd, off_t(offset));
    ::close(fd);
    ASSERT_NE(map, MAP_FAILED);
    unsigned char resident = 1;
    ASSERT_EQ(::mincore(map, page, &resident), 0);
    ::munmap(map, page);
    ASSERT_EQ(resident & 1, 0) << "the file system keeps the page in memory: " << img_;
  }

  TempDir dir_{"/var/tmp"};  // disk-backed: the page cache can drop its pages
  std::string img_;
};

TEST_F(CachedReadTest, PlainDataOnceItsTableIsCached) {
  auto image = open();
  std::vector<uint8_t> buf(100000);
  EXPECT_FALSE(image->try_read_cached(4096, buf)) << "the L2 table is not loaded yet";
  std::vector<uint8_t> first(4096);
  image->read(0, first);  // loads the table
  std::fill(buf.begin(), buf.end(), 0);
  ASSERT_TRUE(image->try_read_cached(4096, buf));  // spans both data clusters
  EXPECT_EQ(buf, std::vector<uint8_t>(buf.size(), 0x42));
}

TEST_F(CachedReadTest, LeavesEverythingButPlainDataToRead) {
  auto image = open();
  std::vector<uint8_t> buf(4096);
  image->read(0, buf);
  EXPECT_FALSE(image->try_read_cached(128 << 10, buf)) << "zero cluster";
  EXPECT_FALSE(image->try_read_cached(192 << 10, buf)) << "unallocated cluster";
  std::vector<uint8_t> across(8192);
  EXPECT_FALSE(image->try_read_cached((128 << 10) - 4096, across)) << "data, then zeros";
  EXPECT_FALSE(image->try_read_cached((1 << 20) - 4096, across)) << "past the end";
}

// An untrusted entry in a table that is already cached: the fast path neither reads through it
// nor throws, and read() on the worker reports it. Also when good data runs into it.
TEST_F(CachedReadTest, SuspectEntryInACachedTableFailsOnTheWorker) {
  std::vector<uint8_t> entry(8);
  store_be64(entry.data(), kFlagCopied | 0x20000);  // cluster 2 "in" the refcount block
  testing::write_file_at(img_, 0x40000 + 2 * 8, entry);
  auto image = open();
  std::vector<uint8_t> buf(4096), across(8192);
  image->read(0, buf);  // loads the table
  EXPECT_FALSE(image->try_read_cached(128 << 10, buf));
  EXPECT_FALSE(image->try_read_cached((128 << 10) - 4096, across));
  image.reset();

  OpenOptions o;
  o.workers = 1;
  auto dev = open_qcow2_device(img_, o);
  auto read_result = [&](uint64_t offset, std::vector<uint8_t>& b) {
    iovec iov{b.data(), b.size()};
    std::promise<int> done;
    dev->read(offset, std::span(&iov, 1), [&](int r) { done.set_value(r); });
    return done.get_future().get();
  };
  EXPECT_EQ(read_result(0, buf), 0);
  EXPECT_EQ(read_result(128 << 10, buf), -EIO);
  EXPECT_EQ(read_result((128 << 10) - 4096, across), -EIO);
  EXPECT_EQ(read_result(4096, buf), 0) << "the good clusters still read";
}

TEST_F(CachedReadTest, DataNotInThePageCacheIsLeftToRead) {
  auto image = open();
  std::vector<uint8_t> buf(4096);
  image->read(0, buf);                     // the table stays in the image's cache
  evict_page_cache(0x50000 + (64 << 10));  // where qemu-img put the second data cluster
  EXPECT_FALSE(image->try_read_cached(64 << 10, buf)) << "would wait for the disk";
  image->read(64 << 10, buf);  // brings it back
  std::fill(buf.begin(), buf.end(), 0);
  ASSERT_TRUE(image->try_read_cached(64 << 10, buf));
  EXPECT_EQ(buf, std::vector<uint8_t>(buf.size(), 0x42));
}

TEST_F(CachedReadTest, NeverUnderCacheNone) {
  auto image = open(CacheMode::kNone);
  std::vector<uint8_t> buf(4096);
  image->read(0, buf);
  EXPECT_FALSE(image->try_read_cached(0, buf));
}

// The device answers a cached read before read() returns, on the caller's thread; a read that
// needs the disk completes later on a worker. Both with the right bytes.
TEST_F(CachedReadTest, DeviceCompletesCachedReadsOnTheCallersThread) {
  OpenOptions o;
  o.workers = 1;
  auto dev = open_qcow2_device(img_, o);
  auto read_on = [&](uint64_t offset, std::vector<uint8_t>& buf) {
    iovec iov{buf.data(), buf.size()};
    std::promise<std::thread::id> done;
    dev->read(offset, std::span(&iov, 1), [&](int r) {
      EXPECT_EQ(r, 0);
      done.set_value(std::this_thread::get_id());
    });
    return done.get_future().get();
  };
  std::vector<uint8_t> buf(4096);
  EXPECT_NE(read_on(0, buf), std::this_thread::get_id()) << "the table had to be loaded";
  EXPECT_EQ(buf, std::vector<uint8_t>(buf.size(), 0x42));
  std::fill(buf.begin(), buf.end(), 0);
  EXPECT_EQ(read_on(4096, buf), std::this_thread::get_id());
  EXPECT_EQ(buf, std::vector<uint8_t>(buf.size(), 0x42));
  std::fill(buf.begin(), buf.end(), 1);
  EXPECT_NE(read_on(128 << 10, buf), std::this_thread::get_id()) << "zero cluster: a worker";
  EXPECT_EQ(buf, std::vector<uint8_t>(buf.size(), 0));
}

}  // namespace
}  // namespace kiln::block::qcow2
