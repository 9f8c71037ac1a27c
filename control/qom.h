// The QOM (QEMU Object Model) paths and properties kiln exposes through qom-get, qom-set and
// qom-list. kiln has no object tree; it answers for the objects management tools look up, with
// QEMU's texts: today the balloon ("/machine/peripheral/balloon0", as if QEMU had been given
// -device virtio-balloon,id=balloon0), whose guest-stats libvirt and others poll.
#pragma once

#include <nlohmann/json.hpp>
#include <string>

#include "control/vm_control.h"

namespace kiln::control {

inline constexpr std::string_view kBalloonQomPath = "/machine/peripheral/balloon0";

// Each throws QmpError with QEMU's class and text for an unknown path or property, a read-only
// property, or a value of the wrong type or range.
nlohmann::json qom_get(VmControl& vm, const std::string& path, const std::string& property);
void qom_set(VmControl& vm, const std::string& path, const std::string& property,
             const nlohmann::json& value);
nlohmann::json qom_list(VmControl& vm, const std::string& path);

}  // namespace kiln::control
