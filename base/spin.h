// Busy-waiting for another thread, for the few places where a futex sleep and wake-up (two
// context switches) cost more than the wait itself. Callers bound the wait with a deadline.
#pragma once

#include <chrono>

namespace kiln {

// Tells the CPU this is a spin loop: it yields the core's resources to a sibling hyperthread
// and avoids the memory-order mis-speculation penalty when the loop exits.
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Spins until done() is true (returns true) or the deadline passes (returns false). done() must
// be cheap and lock-free: it runs every iteration; the clock is read once per 64.
template <typename Done>
bool spin_until(Done done, std::chrono::steady_clock::time_point deadline) {
  for (;;) {
    for (int i = 0; i < 64; ++i) {
      if (done()) return true;
      cpu_relax();
    }
    if (std::chrono::steady_clock::now() >= deadline) return done();
  }
}

}  // namespace kiln
