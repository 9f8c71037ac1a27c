// Integer arithmetic that sizes and offsets need everywhere.
#pragma once

#include <cstdint>

namespace kiln {

// a / b rounded up; b > 0.
constexpr uint64_t div_round_up(uint64_t a, uint64_t b) { return a / b + (a % b != 0); }
// a rounded up to a multiple of b; b > 0.
constexpr uint64_t round_up(uint64_t a, uint64_t b) { return div_round_up(a, b) * b; }
// a rounded down to a multiple of b; b > 0.
constexpr uint64_t round_down(uint64_t a, uint64_t b) { return a / b * b; }

}  // namespace kiln
