// Internal snapshots: reading the snapshot table.
#include <fmt/format.h>

#include "block/qcow2/file_io.h"
#include "block/qcow2/qcow2.h"

namespace kiln::block::qcow2 {

namespace {
constexpr uint32_t kMaxSnapshotExtraData = 1024;  // QEMU's QCOW_MAX_SNAPSHOT_EXTRA_DATA
}

std::vector<SnapshotInfo> Image::snapshots() {
  std::lock_guard lock(mu_);
  std::vector<SnapshotInfo> out;
  const uint64_t fsize = file_size();
  uint64_t pos = header_.snapshots_offset;
  for (uint32_t i = 0; i < header_.nb_snapshots; ++i) {
    uint8_t fixed[40];
    if (pos > fsize || fsize - pos < sizeof fixed) {
      throw Qcow2Error("snapshot table lies past the end of the file");
    }
    pread_exact(fd_.get(), fixed, pos, "snapshot table");
    SnapshotInfo s;
    s.l1_table_offset = load_be64(fixed);
    s.l1_size = load_be32(fixed + 8);
    const uint16_t id_size = load_be16(fixed + 12), name_size = load_be16(fixed + 14);
    s.date_sec = load_be32(fixed + 16);
    s.date_nsec = load_be32(fixed + 20);
    s.vm_clock_nsec = load_be64(fixed + 24);
    s.vm_state_size = load_be32(fixed + 32);
    const uint32_t extra_size = load_be32(fixed + 36);
    if (extra_size > kMaxSnapshotExtraData) {
      throw Qcow2Error(fmt::format("snapshot {} has too much extra data", i));
    }
    const uint64_t var_size = uint64_t(extra_size) + id_size + name_size;
    if (fsize - pos - sizeof fixed < var_size) {
      throw Qcow2Error("snapshot table lies past the end of the file");
    }
    std::vector<uint8_t> var(var_size);
    pread_exact(fd_.get(), var, pos + sizeof fixed, "snapshot table");
    s.disk_size = header_.size;
    if (extra_size >= 8) s.vm_state_size = load_be64(var.data());
    if (extra_size >= 16) s.disk_size = load_be64(var.data() + 8);
    if (extra_size >= 24) s.icount = int64_t(load_be64(var.data() + 16));
    s.id.assign(var.begin() + extra_size, var.begin() + extra_size + id_size);
    s.name.assign(var.begin() + extra_size + id_size, var.end());
    out.push_back(std::move(s));
    pos += (sizeof fixed + var_size + 7) & ~uint64_t{7};
  }
  return out;
}

}  // namespace kiln::block::qcow2
