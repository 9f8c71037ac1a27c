// Splits a byte stream of concatenated JSON values (what a QMP client sends) into one text per
// top-level value, across arbitrary read boundaries.
//
// Why not nlohmann::json directly: its parse() wants exactly one complete value, and its
// stream/SAX modes cannot resume after running out of input, nor say where a value ended. A QMP
// socket delivers several objects per read, or half an object, so we first find value boundaries
// with a tiny scanner that only tracks nesting and string/escape state, and then hand each
// complete text to nlohmann::json for real parsing and validation.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

namespace kiln::control {

class JsonStreamSplitter {
 public:
  struct Item {
    enum class Kind {
      kValue,     // text holds one complete top-level value (maybe malformed inside)
      kError,     // text holds a "JSON parse error, ..." description; the stream continues
      kOverflow,  // a value exceeded the size or nesting limit; the stream is dead
    };
    Kind kind;
    std::string text;
  };

  static constexpr size_t kDefaultMaxValueBytes = 1 << 20;
  static constexpr size_t kDefaultMaxDepth = 1024;

  explicit JsonStreamSplitter(size_t max_value_bytes = kDefaultMaxValueBytes,
                              size_t max_depth = kDefaultMaxDepth)
      : max_value_bytes_(max_value_bytes), max_depth_(max_depth) {}

  // Consumes bytes and appends every item completed by them to out. After a kOverflow item,
  // further input is ignored.
  void feed(std::string_view bytes, std::vector<Item>& out);

  bool dead() const { return dead_; }
  size_t pending_bytes() const { return pending_.size(); }

 private:
  enum class State { kIdle, kContainer, kScalar };

  void feed_byte(char c, std::vector<Item>& out);
  void idle_byte(char c, std::vector<Item>& out);
  void container_byte(char c, std::vector<Item>& out);
  void finish_value(std::vector<Item>& out);
  void overflow(std::vector<Item>& out, const std::string& why);

  size_t max_value_bytes_;
  size_t max_depth_;
  State state_ = State::kIdle;
  std::string pending_;
  size_t depth_ = 0;
  bool in_string_ = false;
  bool escaped_ = false;
  bool dead_ = false;
};

}  // namespace kiln::control
