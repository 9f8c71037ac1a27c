// Feeds arbitrary bytes, as a client would send them, through JsonStreamSplitter and QmpSession
// against a fake VM. The input is cut into reads at positions chosen by its first bytes, so
// split-object handling is exercised too. Every reply must serialize to a JSON object.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>
#include <vector>

#include "control/fake_vm_test_util.h"
#include "control/json_stream.h"
#include "control/qmp_session.h"

namespace {

void check_reply(const nlohmann::json& message) {
  std::string line = kiln::control::serialize_message(message);
  if (!message.is_object() || !nlohmann::json::accept(line)) std::abort();
  if (!message.contains("return") && !message.contains("error")) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using kiln::control::JsonStreamSplitter;
  kiln::control::testing::FakeVm vm;
  vm.has_balloon = size > 0 && (data[0] & 1);
  vm.cpu_list = {{0, 1, "/machine/cpu[0]", 0, 0, 0}};
  kiln::control::QmpSession session(vm);
  JsonStreamSplitter splitter(4096, 64);

  // The first byte picks the read size, so one input is replayed with different boundaries.
  size_t chunk = size > 0 ? 1 + data[0] % 64 : 1;
  std::string_view bytes(reinterpret_cast<const char*>(data), size);
  std::vector<JsonStreamSplitter::Item> items;
  // Negotiate first half the time so the post-negotiation commands get coverage.
  if (size > 1 && (data[1] & 1)) session.handle_text(R"({"execute":"qmp_capabilities"})");
  for (size_t pos = 0; pos < bytes.size() && !splitter.dead(); pos += chunk) {
    items.clear();
    splitter.feed(bytes.substr(pos, chunk), items);
    for (const auto& item : items) {
      if (item.kind != JsonStreamSplitter::Item::Kind::kValue) continue;
      if (item.text.size() > 4096) std::abort();
      check_reply(session.handle_text(item.text).message);
    }
  }
  return 0;
}
