// BlockDevice adapter over a qcow2 (or raw-backed) Image: requests run on a small worker pool
// and complete with 0 or -errno.
#pragma once

#include <memory>
#include <string>

#include "block/block_device.h"
#include "block/qcow2/qcow2.h"

namespace kiln::block::qcow2 {

// Opens `path` (and its backing chain) as an asynchronous BlockDevice. Throws like Image::open.
std::unique_ptr<BlockDevice> open_qcow2_device(const std::string& path, const OpenOptions& opts);

}  // namespace kiln::block::qcow2
