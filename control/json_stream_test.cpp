#include "control/json_stream.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace kiln::control {
namespace {

using Item = JsonStreamSplitter::Item;
using Kind = Item::Kind;

std::vector<Item> feed_all(JsonStreamSplitter& splitter, std::string_view bytes) {
  std::vector<Item> out;
  splitter.feed(bytes, out);
  return out;
}

std::vector<std::string> values(const std::vector<Item>& items) {
  std::vector<std::string> texts;
  for (const auto& item : items) {
    EXPECT_EQ(item.kind, Kind::kValue) << item.text;
    texts.push_back(item.text);
  }
  return texts;
}

TEST(JsonStreamSplitter, OneObject) {
  JsonStreamSplitter splitter;
  EXPECT_EQ(values(feed_all(splitter, R"({"execute":"stop"})")),
            std::vector<std::string>{R"({"execute":"stop"})"});
  EXPECT_EQ(splitter.pending_bytes(), 0u);
}

TEST(JsonStreamSplitter, SeveralObjectsInOneRead) {
  JsonStreamSplitter splitter;
  auto texts = values(feed_all(splitter, "{\"a\":1}{\"b\":[2]}\r\n  {\"c\":{}}\n"));
  EXPECT_EQ(texts, (std::vector<std::string>{R"({"a":1})", R"({"b":[2]})", R"({"c":{}})"}));
}

TEST(JsonStreamSplitter, ObjectSplitAcrossEveryByteBoundary) {
  const std::string stream =
      R"({"execute":"human-monitor-command","arguments":{"command-line":"info \"}{ status"}} [1,{"x":"\\"}])";
  JsonStreamSplitter whole;
  auto expected = values(feed_all(whole, stream));
  ASSERT_EQ(expected.size(), 2u);
  for (size_t cut = 0; cut <= stream.size(); ++cut) {
    JsonStreamSplitter splitter;
    auto items = feed_all(splitter, std::string_view(stream).substr(0, cut));
    auto rest = feed_all(splitter, std::string_view(stream).substr(cut));
    items.insert(items.end(), rest.begin(), rest.end());
    EXPECT_EQ(values(items), expected) << "cut at " << cut;
  }
}

TEST(JsonStreamSplitter, ByteByByte) {
  const std::string stream = "{\"s\":\"}]\\\\\"}\n{\"t\":[[],[{}]]}";
  JsonStreamSplitter splitter;
  std::vector<Item> items;
  for (char c : stream) splitter.feed(std::string_view(&c, 1), items);
  EXPECT_EQ(values(items), (std::vector<std::string>{"{\"s\":\"}]\\\\\"}", "{\"t\":[[],[{}]]}"}));
}

TEST(JsonStreamSplitter, BracesInsideStringsDoNotCount) {
  JsonStreamSplitter splitter;
  auto texts = values(feed_all(splitter, R"({"k":"{{{[[["}{"q":"\"}"})"));
  EXPECT_EQ(texts, (std::vector<std::string>{R"({"k":"{{{[[["})", R"({"q":"\"}"})"}));
}

TEST(JsonStreamSplitter, TopLevelScalarsAreValues) {
  JsonStreamSplitter splitter;
  auto texts = values(feed_all(splitter, "42 \"str{\" true\nnull[1]"));
  EXPECT_EQ(texts, (std::vector<std::string>{"42", "\"str{\"", "true", "null", "[1]"}));
}

TEST(JsonStreamSplitter, StrayCloserIsAnErrorAndStreamContinues) {
  JsonStreamSplitter splitter;
  auto items = feed_all(splitter, "}{\"a\":1}");
  ASSERT_EQ(items.size(), 2u);
  EXPECT_EQ(items[0].kind, Kind::kError);
  EXPECT_EQ(items[0].text, "JSON parse error, expecting value");
  EXPECT_EQ(items[1].kind, Kind::kValue);
  EXPECT_FALSE(splitter.dead());
}

TEST(JsonStreamSplitter, OversizedValueKillsTheStream) {
  JsonStreamSplitter splitter(64);
  auto items = feed_all(splitter, "{\"a\":\"" + std::string(100, 'x') + "\"}{\"b\":1}");
  ASSERT_EQ(items.size(), 1u);
  EXPECT_EQ(items[0].kind, Kind::kOverflow);
  EXPECT_TRUE(splitter.dead());
  EXPECT_TRUE(feed_all(splitter, "{}").empty());
}

TEST(JsonStreamSplitter, OversizedScalarKillsTheStream) {
  JsonStreamSplitter splitter(16);
  auto items = feed_all(splitter, std::string(40, '7'));
  ASSERT_EQ(items.size(), 1u);
  EXPECT_EQ(items[0].kind, Kind::kOverflow);
}

TEST(JsonStreamSplitter, ValueExactlyAtLimitPasses) {
  const std::string value = "{\"a\":\"" + std::string(10, 'x') + "\"}";
  JsonStreamSplitter splitter(value.size());
  EXPECT_EQ(values(feed_all(splitter, value)), std::vector<std::string>{value});
}

TEST(JsonStreamSplitter, TooDeepNestingKillsTheStream) {
  JsonStreamSplitter splitter(1 << 20, 8);
  auto items = feed_all(splitter, std::string(9, '['));
  ASSERT_EQ(items.size(), 1u);
  EXPECT_EQ(items[0].kind, Kind::kOverflow);
  JsonStreamSplitter ok(1 << 20, 8);
  EXPECT_EQ(values(feed_all(ok, std::string(8, '[') + std::string(8, ']'))).size(), 1u);
}

TEST(JsonStreamSplitter, IncompleteValueStaysPending) {
  JsonStreamSplitter splitter;
  EXPECT_TRUE(feed_all(splitter, "{\"a\": [1, 2").empty());
  EXPECT_EQ(splitter.pending_bytes(), 11u);
  EXPECT_EQ(values(feed_all(splitter, "]}")).size(), 1u);
}

}  // namespace
}  // namespace kiln::control
