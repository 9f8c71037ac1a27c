#include "block/raw/range_serializer.h"

#include <gtest/gtest.h>

#include <vector>

namespace kiln::block::raw_internal {
namespace {

// Records which requests have started and keeps their tickets for release.
struct Recorder {
  std::vector<int> started;
  std::vector<RangeSerializer::Ticket> tickets = std::vector<RangeSerializer::Ticket>(16);
  RangeSerializer::StartFn start(int id) {
    return [this, id](RangeSerializer::Ticket ticket) {
      started.push_back(id);
      tickets[id] = ticket;
    };
  }
};

TEST(RangeSerializerTest, SharedOverlappingRangesRunTogether) {
  RangeSerializer serializer;
  Recorder recorder;
  serializer.acquire(0, 4096, false, recorder.start(0));
  serializer.acquire(0, 8192, false, recorder.start(1));
  EXPECT_EQ(recorder.started, (std::vector<int>{0, 1}));
  serializer.release(recorder.tickets[0]);
  serializer.release(recorder.tickets[1]);
  EXPECT_EQ(serializer.size(), 0u);
}

TEST(RangeSerializerTest, ExclusiveWaitsForEarlierOverlapAndThenRuns) {
  RangeSerializer serializer;
  Recorder recorder;
  serializer.acquire(0, 4096, false, recorder.start(0));
  serializer.acquire(4096, 8192, false, recorder.start(1));
  serializer.acquire(2048, 6144, true, recorder.start(2));   // overlaps both
  serializer.acquire(8192, 12288, true, recorder.start(3));  // overlaps nothing
  EXPECT_EQ(recorder.started, (std::vector<int>{0, 1, 3}));
  serializer.release(recorder.tickets[0]);
  EXPECT_EQ(recorder.started, (std::vector<int>{0, 1, 3}));
  serializer.release(recorder.tickets[1]);
  EXPECT_EQ(recorder.started, (std::vector<int>{0, 1, 3, 2}));
}

TEST(RangeSerializerTest, LaterWritesQueueBehindAWaitingExclusiveOne) {
  RangeSerializer serializer;
  Recorder recorder;
  serializer.acquire(0, 4096, true, recorder.start(0));
  serializer.acquire(0, 4096, true, recorder.start(1));
  serializer.acquire(0, 4096, false, recorder.start(2));     // behind 1, in order
  serializer.acquire(4096, 8192, false, recorder.start(3));  // elsewhere: free to go
  EXPECT_EQ(recorder.started, (std::vector<int>{0, 3}));
  serializer.release(recorder.tickets[0]);
  EXPECT_EQ(recorder.started, (std::vector<int>{0, 3, 1}));
  serializer.release(recorder.tickets[1]);
  EXPECT_EQ(recorder.started, (std::vector<int>{0, 3, 1, 2}));
}

TEST(RangeSerializerTest, AdjacentRangesDoNotConflict) {
  RangeSerializer serializer;
  Recorder recorder;
  serializer.acquire(0, 4096, true, recorder.start(0));
  serializer.acquire(4096, 8192, true, recorder.start(1));
  EXPECT_EQ(recorder.started, (std::vector<int>{0, 1}));
}

}  // namespace
}  // namespace kiln::block::raw_internal
