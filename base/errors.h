// Error helpers shared by every subsystem.
#pragma once

#include <cerrno>
#include <string>
#include <system_error>

namespace kiln {

// Throws std::system_error for the current errno with `what` as context.
[[noreturn]] inline void throw_errno(const std::string& what) {
  throw std::system_error(errno, std::generic_category(), what);
}

// Throws for `err` (a positive errno value, as returned by liburing and friends).
[[noreturn]] inline void throw_error_code(int err, const std::string& what) {
  throw std::system_error(err, std::generic_category(), what);
}

}  // namespace kiln
