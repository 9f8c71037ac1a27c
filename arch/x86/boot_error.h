// The one exception type the x86 boot code throws: bad kernel/initramfs files, a command line
// the kernel cannot take, or a guest too small to hold what must be loaded.
#pragma once

#include <stdexcept>

namespace kiln::x86 {

class BootError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace kiln::x86
