// The readable or writable half of a validated descriptor chain seen as one byte stream, so
// request parsing does not care how the driver split headers, data and status over buffers.
#pragma once

#include <sys/uio.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

#include "devices/virtio/queue.h"

namespace kiln::devices::virtio {

class ChainBuffers {
 public:
  ChainBuffers(const DescriptorChain& chain, bool writable) {
    for (const Descriptor& d : chain.descriptors) {
      if (d.writable != writable || d.len == 0) continue;
      segments_.push_back({d.host, d.len, d.gpa});
      size_ += d.len;
    }
  }

  uint64_t size() const { return size_; }
  size_t segment_count() const { return segments_.size(); }

  // Copies bytes [offset, offset+out.size()) of the stream; false if it is shorter.
  bool read(uint64_t offset, std::span<uint8_t> out) const {
    return visit(offset, out.size(), [&](uint8_t* host, size_t len, size_t done, uint64_t) {
      std::memcpy(out.data() + done, host, len);
    });
  }
  // Writes into the stream and marks the pages dirty; false if it is shorter.
  bool write(const memory::GuestMemory& memory, uint64_t offset,
             std::span<const uint8_t> in) const {
    return visit(offset, in.size(), [&](uint8_t* host, size_t len, size_t done, uint64_t gpa) {
      std::memcpy(host, in.data() + done, len);
      memory.mark_dirty(gpa, len);
    });
  }
  // Host iovecs covering [offset, offset+len); empty if out of range.
  std::vector<iovec> iovecs(uint64_t offset, uint64_t len) const {
    std::vector<iovec> result;
    bool ok = visit(offset, len, [&](uint8_t* host, size_t chunk, size_t, uint64_t) {
      result.push_back({host, chunk});
    });
    if (!ok) result.clear();
    return result;
  }
  void mark_dirty(const memory::GuestMemory& memory, uint64_t offset, uint64_t len) const {
    visit(offset, len,
          [&](uint8_t*, size_t chunk, size_t, uint64_t gpa) { memory.mark_dirty(gpa, chunk); });
  }
  // Largest single segment (for VIRTIO_BLK_F_SIZE_MAX).
  uint64_t largest_segment() const {
    uint64_t largest = 0;
    for (const auto& s : segments_) largest = std::max<uint64_t>(largest, s.len);
    return largest;
  }

 private:
  struct Segment {
    uint8_t* host;
    uint32_t len;
    uint64_t gpa;
  };

  template <class Fn>
  bool visit(uint64_t offset, uint64_t len, Fn&& fn) const {
    if (offset > size_ || len > size_ - offset) return false;
    size_t done = 0;
    for (const Segment& s : segments_) {
      if (len == 0) break;
      if (offset >= s.len) {
        offset -= s.len;
        continue;
      }
      size_t chunk = size_t(std::min<uint64_t>(s.len - offset, len));
      fn(s.host + offset, chunk, done, s.gpa + offset);
      done += chunk;
      len -= chunk;
      offset = 0;
    }
    return true;
  }

  std::vector<Segment> segments_;
  uint64_t size_ = 0;
};

}  // namespace kiln::devices::virtio
