#include "memory/guest_memory.h"

#include <sys/mman.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "base/errors.h"
#include "base/math.h"

namespace kiln::memory {
namespace {

constexpr uint64_t kPageSize = 4096;
constexpr uint64_t kHugePageSize = 2ull << 20;

uint8_t* map_region(uint64_t size, const Options& options) {
  int flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE;
  if (options.hugepages) flags |= MAP_HUGETLB;
  if (options.prealloc) flags |= MAP_POPULATE;
  void* host = mmap(nullptr, size, PROT_READ | PROT_WRITE, flags, -1, 0);
  if (host == MAP_FAILED) {
    throw_errno("cannot map " + std::to_string(size >> 20) + " MiB of guest memory" +
                (options.hugepages ? " with hugepages (are enough reserved?)" : ""));
  }
  // Guest RAM never goes into a core dump of kiln and is never shared with a forked child.
  madvise(host, size, MADV_DONTDUMP);
  madvise(host, size, MADV_DONTFORK);
  if (!options.hugepages) madvise(host, size, MADV_HUGEPAGE);
  return static_cast<uint8_t*>(host);
}

}  // namespace

struct GuestMemory::DirtyLog {
  std::atomic<bool> enabled{false};
  std::vector<std::unique_ptr<std::atomic<uint64_t>[]>> bitmaps;
  std::vector<size_t> words;
};

std::vector<RegionSpec> layout_ram(uint64_t ram_size) {
  if (ram_size == 0) throw std::invalid_argument("guest memory size must not be zero");
  if (ram_size <= kMmioHoleStart) return {{0, ram_size}};
  return {{0, kMmioHoleStart}, {kFourGiB, ram_size - kMmioHoleStart}};
}

GuestMemory GuestMemory::create(std::span<const RegionSpec> specs, const Options& options) {
  std::vector<RegionSpec> sorted(specs.begin(), specs.end());
  std::sort(sorted.begin(), sorted.end(), [](auto& a, auto& b) { return a.gpa < b.gpa; });
  GuestMemory memory;
  memory.dirty_ = std::make_unique<DirtyLog>();
  uint64_t previous_end = 0;
  for (const RegionSpec& spec : sorted) {
    if (spec.size == 0 || spec.gpa % kPageSize || spec.size % kPageSize)
      throw std::invalid_argument("guest memory regions must be non-empty and page aligned");
    if (spec.gpa < previous_end) throw std::invalid_argument("guest memory regions overlap");
    if (spec.gpa + spec.size < spec.gpa) throw std::invalid_argument("guest memory region wraps");
    previous_end = spec.gpa + spec.size;
    uint64_t mapped = options.hugepages ? round_up(spec.size, kHugePageSize) : spec.size;
    uint8_t* host = map_region(mapped, options);
    memory.regions_.push_back({spec.gpa, spec.size, host});
    memory.mapping_sizes_.push_back(mapped);
    size_t words = (spec.size / kPageSize + 63) / 64;
    memory.dirty_->bitmaps.push_back(std::make_unique<std::atomic<uint64_t>[]>(words));
    memory.dirty_->words.push_back(words);
  }
  return memory;
}

GuestMemory GuestMemory::create_ram(uint64_t ram_size, const Options& options) {
  auto specs = layout_ram(round_up(ram_size, kPageSize));
  return create(specs, options);
}

GuestMemory::GuestMemory(GuestMemory&& other) noexcept
    : regions_(std::move(other.regions_)),
      mapping_sizes_(std::move(other.mapping_sizes_)),
      dirty_(std::move(other.dirty_)) {
  other.regions_.clear();
}

GuestMemory& GuestMemory::operator=(GuestMemory&& other) noexcept {
  // Swap: `other` unmaps what this held when it is destroyed.
  std::swap(regions_, other.regions_);
  std::swap(mapping_sizes_, other.mapping_sizes_);
  std::swap(dirty_, other.dirty_);
  return *this;
}

GuestMemory::~GuestMemory() {
  for (size_t i = 0; i < regions_.size(); ++i) munmap(regions_[i].host, mapping_sizes_[i]);
  regions_.clear();
}

uint64_t GuestMemory::total_size() const {
  uint64_t total = 0;
  for (const Region& r : regions_) total += r.size;
  return total;
}

uint64_t GuestMemory::end() const { return regions_.empty() ? 0 : regions_.back().end(); }

const Region* GuestMemory::find(uint64_t gpa) const {
  for (const Region& r : regions_)
    if (gpa >= r.gpa && gpa - r.gpa < r.size) return &r;
  return nullptr;
}

std::optional<std::span<uint8_t>> GuestMemory::slice(uint64_t gpa, uint64_t len) const {
  for (const Region& r : regions_)
    if (r.contains(gpa, len)) return std::span<uint8_t>(r.host + (gpa - r.gpa), len);
  return std::nullopt;
}

bool GuestMemory::read(uint64_t gpa, std::span<uint8_t> out) const {
  auto src = slice(gpa, out.size());
  if (!src) return false;
  std::memcpy(out.data(), src->data(), out.size());
  return true;
}

bool GuestMemory::write(uint64_t gpa, std::span<const uint8_t> in) const {
  auto dst = slice(gpa, in.size());
  if (!dst) return false;
  std::memcpy(dst->data(), in.data(), in.size());
  mark_dirty(gpa, in.size());
  return true;
}

void GuestMemory::enable_dirty_log(bool on) { dirty_->enabled = on; }

void GuestMemory::mark_dirty(uint64_t gpa, uint64_t len) const {
  if (!dirty_ || !dirty_->enabled.load(std::memory_order_relaxed) || len == 0) return;
  for (size_t i = 0; i < regions_.size(); ++i) {
    const Region& r = regions_[i];
    if (!r.contains(gpa, len)) continue;
    for (uint64_t page = (gpa - r.gpa) / kPageSize; page <= (gpa - r.gpa + len - 1) / kPageSize;
         ++page)
      dirty_->bitmaps[i][page / 64].fetch_or(1ull << (page % 64), std::memory_order_relaxed);
    return;
  }
}

std::vector<uint64_t> GuestMemory::take_dirty_log(size_t index) {
  std::vector<uint64_t> out(dirty_->words.at(index));
  for (size_t w = 0; w < out.size(); ++w) out[w] = dirty_->bitmaps[index][w].exchange(0);
  return out;
}

bool GuestMemory::discard(uint64_t gpa, uint64_t len) const {
  if (gpa % kPageSize || len % kPageSize) return false;
  auto range = slice(gpa, len);
  if (!range) return false;
  return madvise(range->data(), len, MADV_DONTNEED) == 0;
}

}  // namespace kiln::memory
