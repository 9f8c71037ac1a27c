#include "base/file_bytes.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

namespace kiln {
namespace {

std::string temp_file(const std::string& name, const std::string& content) {
  auto path = std::filesystem::path(::testing::TempDir()) / name;
  std::ofstream(path, std::ios::binary | std::ios::trunc) << content;
  return path.string();
}

TEST(FileBytes, MapsAWholeFile) {
  auto path = temp_file("file-bytes-whole", std::string(10000, 'k') + "end");
  auto file = FileBytes::map(path);
  ASSERT_EQ(file.size(), 10003u);
  EXPECT_EQ(file.bytes()[0], 'k');
  EXPECT_EQ(file.bytes()[10002], 'd');
  FileBytes moved = std::move(file);  // the mapping moves, it is not copied or unmapped
  EXPECT_EQ(moved.size(), 10003u);
  EXPECT_EQ(file.size(), 0u);
}

TEST(FileBytes, AnEmptyFileHasNoBytes) {
  EXPECT_EQ(FileBytes::map(temp_file("file-bytes-empty", "")).size(), 0u);
}

TEST(FileBytes, OwnsBytesBuiltInMemory) {
  FileBytes owned(std::vector<uint8_t>{1, 2, 3});
  EXPECT_EQ(owned.size(), 3u);
  EXPECT_EQ(owned.bytes()[2], 3);
}

TEST(FileBytes, MissingFilesAndDirectoriesAreErrorsThatNameThePath) {
  try {
    FileBytes::map("/no/such/file");
    ADD_FAILURE() << "mapped a missing file";
  } catch (const std::system_error& e) {
    EXPECT_EQ(e.code().value(), ENOENT);
    EXPECT_NE(std::string(e.what()).find("/no/such/file"), std::string::npos);
  }
  EXPECT_THROW(FileBytes::map(::testing::TempDir()), std::system_error);
}

}  // namespace
}  // namespace kiln
