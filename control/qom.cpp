#include "control/qom.h"

#include <array>
#include <cstdint>
#include <limits>

namespace kiln::control {
namespace {

using nlohmann::json;

// QEMU's names for the VIRTIO_BALLOON_S_* tags, in tag order.
constexpr std::array<std::string_view, 10> kStatNames = {
    "stat-swap-in",      "stat-swap-out",     "stat-major-faults",     "stat-minor-faults",
    "stat-free-memory",  "stat-total-memory", "stat-available-memory", "stat-disk-caches",
    "stat-htlb-pgalloc", "stat-htlb-pgfail",
};
// A statistic the guest has not reported. QEMU keeps it as (uint64_t)-1 and prints it so.
constexpr uint64_t kStatUnknown = std::numeric_limits<uint64_t>::max();

constexpr std::string_view kBalloonType = "virtio-balloon-pci";
constexpr std::string_view kStatsProperty = "guest-stats";
constexpr std::string_view kIntervalProperty = "guest-stats-polling-interval";

[[noreturn]] void generic_error(const std::string& desc) { throw QmpError("GenericError", desc); }

// QOM resolves a partial path ("balloon0") when exactly one object ends that way.
bool is_balloon_path(const std::string& path) {
  return path == kBalloonQomPath || path == "balloon0";
}

// Checks that `path` names an object kiln has; the balloon is the only one.
void require_balloon(VmControl& vm, const std::string& path) {
  if (!is_balloon_path(path) || !vm.balloon_stats_interval())
    throw QmpError("DeviceNotFound", "Device '" + path + "' not found");
}

std::string property_name(std::string_view type, const std::string& property) {
  return "Property '" + std::string(type) + "." + property + "'";
}

json guest_stats_json(const BalloonStats& stats) {
  json values = json::object();
  for (size_t tag = 0; tag < kStatNames.size(); ++tag) {
    auto it = stats.values.find(uint16_t(tag));
    values[std::string(kStatNames[tag])] = it == stats.values.end() ? kStatUnknown : it->second;
  }
  return {{"stats", values}, {"last-update", stats.last_update}};
}

// QAPI's 'int' is int64: floats and unsigned values past INT64_MAX are not integers.
bool is_int64(const json& value) {
  if (!value.is_number_integer()) return false;
  return !value.is_number_unsigned() ||
         value.get<uint64_t>() <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
}

uint32_t polling_interval(const json& value) {
  if (!is_int64(value))
    generic_error("Invalid parameter type for '" + std::string(kIntervalProperty) +
                  "', expected: integer");
  const int64_t seconds = value.get<int64_t>();
  if (seconds < 0) generic_error("timer value must be greater than zero");
  if (seconds > int64_t(std::numeric_limits<uint32_t>::max()))
    generic_error("timer value is too big");
  return uint32_t(seconds);
}

}  // namespace

json qom_get(VmControl& vm, const std::string& path, const std::string& property) {
  require_balloon(vm, path);
  if (property == "type") return kBalloonType;
  if (property == kIntervalProperty) return vm.balloon_stats_interval().value_or(0);
  if (property == kStatsProperty)
    return guest_stats_json(vm.balloon_stats().value_or(BalloonStats{}));
  generic_error(property_name(kBalloonType, property) + " not found");
}

void qom_set(VmControl& vm, const std::string& path, const std::string& property,
             const json& value) {
  require_balloon(vm, path);
  if (property == kIntervalProperty) {
    vm.set_balloon_stats_interval(polling_interval(value));
    return;
  }
  // QEMU names the object that defines the property: guest-stats lives on the virtio device
  // behind the PCI proxy.
  if (property == kStatsProperty)
    generic_error(property_name("virtio-balloon-device", property) + " is not writable");
  if (property == "type") generic_error(property_name(kBalloonType, property) + " is not writable");
  generic_error(property_name(kBalloonType, property) + " not found");
}

json qom_list(VmControl& vm, const std::string& path) {
  require_balloon(vm, path);
  return json::array({{{"name", "type"}, {"type", "string"}},
                      {{"name", std::string(kIntervalProperty)}, {"type", "int"}},
                      {{"name", std::string(kStatsProperty)}, {"type", "guest statistics"}}});
}

}  // namespace kiln::control
