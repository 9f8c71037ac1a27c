#include "control/json_stream.h"

namespace kiln::control {
namespace {

bool is_json_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }
bool is_structural(char c) {
  return c == '{' || c == '}' || c == '[' || c == ']' || c == '"' || c == ',' || c == ':';
}

}  // namespace

void JsonStreamSplitter::feed(std::string_view bytes, std::vector<Item>& out) {
  for (char c : bytes) {
    if (dead_) return;
    feed_byte(c, out);
  }
}

void JsonStreamSplitter::feed_byte(char c, std::vector<Item>& out) {
  switch (state_) {
    case State::kIdle:
      idle_byte(c, out);
      return;
    case State::kScalar:
      // A bare scalar (42, true, nul...) ends at whitespace or at the next structural byte,
      // which then starts over in the idle state.
      if (is_json_space(c) || is_structural(c)) {
        finish_value(out);
        idle_byte(c, out);
        return;
      }
      break;
    case State::kContainer:
      container_byte(c, out);
      return;
  }
  pending_.push_back(c);
  if (pending_.size() > max_value_bytes_) overflow(out, "JSON value too large");
}

void JsonStreamSplitter::idle_byte(char c, std::vector<Item>& out) {
  if (is_json_space(c)) return;
  if (c == '}' || c == ']' || c == ',' || c == ':') {
    // A closer or separator with nothing open: QEMU reports the same and carries on.
    out.push_back({Item::Kind::kError, "JSON parse error, expecting value"});
    return;
  }
  pending_.assign(1, c);
  if (c == '{' || c == '[') {
    state_ = State::kContainer;
    depth_ = 1;
  } else if (c == '"') {
    // A top-level string is a container of depth 0 that ends at its closing quote.
    state_ = State::kContainer;
    depth_ = 0;
    in_string_ = true;
  } else {
    state_ = State::kScalar;
  }
}

void JsonStreamSplitter::container_byte(char c, std::vector<Item>& out) {
  pending_.push_back(c);
  if (pending_.size() > max_value_bytes_) {
    overflow(out, "JSON value too large");
    return;
  }
  if (in_string_) {
    if (escaped_) {
      escaped_ = false;
    } else if (c == '\\') {
      escaped_ = true;
    } else if (c == '"') {
      in_string_ = false;
      if (depth_ == 0) finish_value(out);
    }
    return;
  }
  if (c == '"') {
    in_string_ = true;
  } else if (c == '{' || c == '[') {
    if (++depth_ > max_depth_) overflow(out, "JSON nesting too deep");
  } else if (c == '}' || c == ']') {
    // Mismatched pairs ({]) are left for the real parser to reject; only depth matters here.
    if (--depth_ == 0) finish_value(out);
  }
}

void JsonStreamSplitter::finish_value(std::vector<Item>& out) {
  out.push_back({Item::Kind::kValue, std::move(pending_)});
  pending_.clear();
  state_ = State::kIdle;
  depth_ = 0;
  in_string_ = false;
  escaped_ = false;
}

void JsonStreamSplitter::overflow(std::vector<Item>& out, const std::string& why) {
  out.push_back({Item::Kind::kOverflow, why});
  pending_.clear();
  pending_.shrink_to_fit();
  dead_ = true;
}

}  // namespace kiln::control
