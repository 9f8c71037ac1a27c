// A recording IrqLine for the legacy device tests.
#pragma once

#include <vector>

#include "devices/irq.h"

namespace kiln::devices::legacy {

struct FakeIrq : IrqLine {
  bool level = false;
  std::vector<bool> changes;  // every set_level call, in order
  void set_level(bool asserted) override {
    level = asserted;
    changes.push_back(asserted);
  }
};

}  // namespace kiln::devices::legacy
