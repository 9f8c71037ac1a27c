#include "control/qmp_server.h"

#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <thread>

#include "control/fake_vm_test_util.h"

namespace kiln::control {
namespace {

using nlohmann::json;
using testing::FakeVm;
using testing::QmpTestClient;
using namespace std::chrono_literals;

std::string make_temp_dir() {
  std::string pattern = (std::filesystem::temp_directory_path() / "kiln-qmp-XXXXXX").string();
  if (mkdtemp(pattern.data()) == nullptr) std::abort();
  return pattern;
}

bool wait_until(const std::function<bool()>& condition, std::chrono::milliseconds timeout = 5s) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    if (condition()) return true;
    std::this_thread::sleep_for(5ms);
  }
  return condition();
}

class QmpServerTest : public ::testing::Test {
 protected:
  QmpServerTest() : dir_(make_temp_dir()), path_(dir_ + "/qmp.sock") {}
  ~QmpServerTest() override {
    server_.reset();
    std::filesystem::remove_all(dir_);
  }

  void start(QmpServerOptions options = {}) {
    server_ = std::make_unique<QmpServer>(vm_, QmpServer::listen_unix(path_), options);
    vm_.emit = [this](std::string_view name, json data) { server_->emit_event(name, data); };
    server_->start();
  }

  // A connected client that has read the greeting and (optionally) negotiated.
  std::unique_ptr<QmpTestClient> connect(bool negotiate = true) {
    auto client = std::make_unique<QmpTestClient>(QmpTestClient::connect_unix(path_));
    auto greeting = client->read_message();
    EXPECT_TRUE(greeting && greeting->contains("QMP"));
    if (negotiate) {
      EXPECT_EQ(client->execute("qmp_capabilities"), json({{"return", json::object()}}));
    }
    return client;
  }

  FakeVm vm_;
  std::string dir_;
  std::string path_;
  std::unique_ptr<QmpServer> server_;
};

TEST_F(QmpServerTest, GreetingNegotiationAndCommands) {
  start();
  auto client = connect(false);
  EXPECT_EQ(client->execute("query-status")["error"]["class"], "CommandNotFound");
  EXPECT_EQ(client->execute("qmp_capabilities"), json({{"return", json::object()}}));
  EXPECT_EQ(client->execute("query-status")["return"]["status"], "running");
  struct stat st {};
  ASSERT_EQ(stat(path_.c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
}

TEST_F(QmpServerTest, StaleSocketIsReplacedButOtherFilesAreNot) {
  {
    UniqueFd stale = QmpServer::listen_unix(path_);  // closed without unlinking, like a crash
  }
  start();
  auto client = connect();
  EXPECT_EQ(client->execute("query-name")["return"]["name"], "testvm");

  std::string regular = dir_ + "/not-a-socket";
  { std::ofstream(regular) << "data"; }
  EXPECT_THROW(QmpServer::listen_unix(regular), std::system_error);
  EXPECT_TRUE(std::filesystem::exists(regular));
  EXPECT_THROW(QmpServer::listen_unix(dir_ + "/" + std::string(200, 'x')), std::invalid_argument);
}

TEST_F(QmpServerTest, ConnectedFdIsServedAsOneClient) {
  int pair[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair), 0);
  QmpServer server(vm_, UniqueFd(pair[0]));
  vm_.emit = [&](std::string_view name, json data) { server.emit_event(name, data); };
  server.start();
  QmpTestClient client{UniqueFd(pair[1])};
  auto greeting = client.read_message();
  ASSERT_TRUE(greeting);
  EXPECT_EQ((*greeting)["QMP"]["capabilities"], json::array());
  EXPECT_EQ(client.execute("qmp_capabilities"), json({{"return", json::object()}}));
  EXPECT_EQ(client.execute("stop"), json({{"return", json::object()}}));
  ASSERT_EQ(client.events().size(), 1u);
  EXPECT_EQ(client.events()[0]["event"], "STOP");
  server.stop();
  EXPECT_FALSE(client.read_message(2000));
  EXPECT_TRUE(client.saw_eof());
}

TEST_F(QmpServerTest, ListeningFdFromOutside) {
  UniqueFd listener = QmpServer::listen_unix(path_);
  server_ = std::make_unique<QmpServer>(vm_, std::move(listener));
  server_->start();
  auto client = connect();
  EXPECT_EQ(client->execute("query-kvm")["return"]["present"], true);
}

TEST_F(QmpServerTest, EndpointSpecServerMode) {
  server_ = std::make_unique<QmpServer>(
      vm_, QmpServer::open_endpoint("unix:" + path_ + ",server=on,wait=off"));
  server_->start();
  auto client = connect();
  EXPECT_EQ(client->execute("query-uuid")["return"]["UUID"],
            "12345678-1234-1234-1234-123456789abc");
}

TEST_F(QmpServerTest, EndpointSpecClientModeConnectsOut) {
  UniqueFd listener = QmpServer::listen_unix(path_);
  server_ = std::make_unique<QmpServer>(vm_, QmpServer::open_endpoint("unix:" + path_));
  server_->start();
  UniqueFd accepted(accept(listener.get(), nullptr, nullptr));
  if (!accepted) {
    pollfd pfd{listener.get(), POLLIN, 0};
    poll(&pfd, 1, 5000);
    accepted = UniqueFd(accept(listener.get(), nullptr, nullptr));
  }
  ASSERT_TRUE(accepted);
  QmpTestClient client(std::move(accepted));
  ASSERT_TRUE(client.read_message());
  EXPECT_EQ(client.execute("qmp_capabilities"), json({{"return", json::object()}}));
}

TEST_F(QmpServerTest, EndpointSpecErrors) {
  EXPECT_THROW(QmpServer::open_endpoint("tcp:localhost:4444"), std::invalid_argument);
  EXPECT_THROW(QmpServer::open_endpoint("unix:" + path_ + ",server,wait=on"),
               std::invalid_argument);
  EXPECT_THROW(QmpServer::open_endpoint("unix:" + path_), std::system_error);  // nobody listens
}

TEST_F(QmpServerTest, RejectsDatagramSockets) {
  int pair[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_DGRAM, 0, pair), 0);
  UniqueFd other(pair[1]);
  EXPECT_THROW(QmpServer(vm_, UniqueFd(pair[0])), std::invalid_argument);
}

TEST_F(QmpServerTest, SeveralObjectsPerWriteAndObjectsSplitAcrossWrites) {
  start();
  auto client = connect();
  client->send_raw(
      R"({"execute":"query-name","id":1}{"execute":"query-uuid","id":2} {"execute":"query-kvm","id":3})"
      "\n");
  for (int id = 1; id <= 3; ++id) EXPECT_EQ((*client->read_reply())["id"], id);

  const std::string request = R"({"execute":"query-status","id":"split"})";
  for (char c : request) {
    client->send_raw(std::string_view(&c, 1));
    std::this_thread::sleep_for(1ms);
  }
  auto reply = client->read_reply();
  ASSERT_TRUE(reply);
  EXPECT_EQ((*reply)["id"], "split");
  EXPECT_EQ((*reply)["return"]["status"], "running");
}

TEST_F(QmpServerTest, BadInputGetsErrorsAndTheConnectionSurvives) {
  start();
  auto client = connect();
  client->send_raw("{\"execute\":\"query-status\", \"bad\"  }\n");
  auto reply = client->read_reply();
  EXPECT_EQ((*reply)["error"]["class"], "GenericError");
  EXPECT_EQ((*reply)["error"]["desc"].get<std::string>().rfind("JSON parse error, ", 0), 0u);
  client->send_raw("}");
  EXPECT_EQ((*client->read_reply())["error"]["desc"], "JSON parse error, expecting value");
  client->send_raw("[1]");
  EXPECT_EQ((*client->read_reply())["error"]["desc"], "QMP input must be a JSON object");
  client->send_raw(R"({"id":7})");
  EXPECT_EQ(*client->read_reply(), json::parse(R"({"id":7,"error":{"class":"GenericError",
      "desc":"QMP input lacks member 'execute'"}})"));
  EXPECT_EQ(client->execute("query-name")["return"]["name"], "testvm");
}

TEST_F(QmpServerTest, OversizedInputIsAnsweredThenDropped) {
  QmpServerOptions options;
  options.max_input_bytes = 4096;
  start(options);
  auto other = connect();
  auto client = connect();
  std::string huge = R"({"execute":"query-status","id":")" + std::string(8192, 'x') + "\"}";
  client->send_raw(huge);
  auto reply = client->read_reply();
  ASSERT_TRUE(reply);
  EXPECT_EQ((*reply)["error"]["desc"], "JSON parse error, JSON value too large");
  EXPECT_FALSE(client->read_message(2000));
  EXPECT_TRUE(client->saw_eof());
  EXPECT_TRUE(wait_until([&] { return server_->client_count() == 1; }));
  EXPECT_EQ(other->execute("query-status")["return"]["running"], true);
}

TEST_F(QmpServerTest, EventsGoOnlyToNegotiatedClientsInOrder) {
  start();
  auto negotiated = connect(true);
  auto fresh = connect(false);
  auto before = std::chrono::system_clock::now();
  for (int i = 0; i < 50; ++i) server_->emit_event("TEST", {{"seq", i}});
  int64_t last_us = 0;
  for (int i = 0; i < 50; ++i) {
    auto event = negotiated->read_message();
    ASSERT_TRUE(event);
    EXPECT_EQ((*event)["event"], "TEST");
    EXPECT_EQ((*event)["data"]["seq"], i);
    int64_t us = (*event)["timestamp"]["seconds"].get<int64_t>() * 1000000 +
                 (*event)["timestamp"]["microseconds"].get<int64_t>();
    EXPECT_GE(us, last_us);
    EXPECT_LT((*event)["timestamp"]["microseconds"].get<int64_t>(), 1000000);
    last_us = us;
  }
  auto before_us =
      std::chrono::duration_cast<std::chrono::microseconds>(before.time_since_epoch()).count();
  EXPECT_GE(last_us, before_us);
  // The un-negotiated client got nothing; its next message is the reply to its command.
  EXPECT_FALSE(fresh->read_message(200));
  fresh->send(json{{"execute", "qmp_capabilities"}});
  EXPECT_EQ(*fresh->read_message(), json({{"return", json::object()}}));
}

TEST_F(QmpServerTest, CommandEventsPrecedeTheReplyAndReachEveryClient) {
  start();
  auto a = connect();
  auto b = connect();
  EXPECT_EQ(a->execute("stop"), json({{"return", json::object()}}));
  ASSERT_EQ(a->events().size(), 1u);
  EXPECT_EQ(a->events()[0]["event"], "STOP");
  EXPECT_FALSE(a->events()[0].contains("data"));
  auto seen_by_b = b->read_message();
  EXPECT_EQ((*seen_by_b)["event"], "STOP");
  EXPECT_EQ(b->execute("system_reset"), json({{"return", json::object()}}));
  ASSERT_EQ(b->events().size(), 1u);
  EXPECT_EQ(b->events()[0]["data"], json::parse(R"({"guest":false,
      "reason":"host-qmp-system-reset"})"));
  EXPECT_EQ((*a->read_message())["event"], "RESET");
}

TEST_F(QmpServerTest, QuitRepliesBeforeCallingTheVm) {
  start();
  auto client = connect();
  client->send(json{{"execute", "quit"}, {"id", "bye"}});
  auto reply = client->read_message();
  EXPECT_EQ(*reply, json({{"return", json::object()}, {"id", "bye"}}));
  // FakeVm::quit() emits SHUTDOWN: seeing it after the reply proves the order.
  auto event = client->read_message();
  ASSERT_TRUE(event);
  EXPECT_EQ((*event)["event"], "SHUTDOWN");
  EXPECT_EQ((*event)["data"], json::parse(R"({"guest":false,"reason":"host-qmp-quit"})"));
  EXPECT_EQ(vm_.quit_calls(), 1);
}

TEST_F(QmpServerTest, SeveralClientsAtOnce) {
  start();
  std::vector<std::thread> threads;
  std::atomic<int> good{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      QmpTestClient client(QmpTestClient::connect_unix(path_));
      if (!client.read_message()) return;
      if (!client.execute("qmp_capabilities").contains("return")) return;
      for (int i = 0; i < 50; ++i) {
        client.send(json{{"execute", "query-status"}, {"id", t * 1000 + i}});
        auto reply = client.read_reply();
        if (!reply || (*reply)["id"] != t * 1000 + i) return;
      }
      ++good;
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(good, 4);
}

TEST_F(QmpServerTest, TooManyClientsAreTurnedAway) {
  QmpServerOptions options;
  options.max_clients = 2;
  start(options);
  auto a = connect();
  auto b = connect();
  QmpTestClient extra(QmpTestClient::connect_unix(path_));
  EXPECT_FALSE(extra.read_message(2000));
  EXPECT_TRUE(extra.saw_eof());
  EXPECT_EQ(a->execute("query-name")["return"]["name"], "testvm");
}

TEST_F(QmpServerTest, SlowClientIsDroppedWithoutStallingOthers) {
  QmpServerOptions options;
  options.max_output_bytes = 64 * 1024;
  start(options);
  auto slow = connect();
  auto fast = connect();
  const json payload = {{"blob", std::string(16 * 1024, 'z')}};
  // The slow client never reads: the kernel buffer fills, then our bounded buffer, then it goes.
  // The fast client keeps getting answers quickly the whole time.
  bool dropped = false;
  for (int round = 0; round < 400 && !dropped; ++round) {
    server_->emit_event("BULK", payload);
    auto start_time = std::chrono::steady_clock::now();
    fast->send(json{{"execute", "query-status"}, {"id", round}});
    auto reply = fast->read_reply(5000);
    ASSERT_TRUE(reply) << "fast client stalled in round " << round;
    EXPECT_EQ((*reply)["id"], round);
    // Generous for a loaded 2-core machine; a server blocked on the slow client never answers.
    EXPECT_LT(std::chrono::steady_clock::now() - start_time, 3s);
    fast->events().clear();
    dropped = server_->client_count() == 1;
  }
  EXPECT_TRUE(dropped);
  // The dropped client can still read what the kernel held, then sees EOF.
  while (slow->read_message(2000)) {
  }
  EXPECT_TRUE(slow->saw_eof());
}

TEST_F(QmpServerTest, ClientVanishingMidReplyDoesNotHurtTheServer) {
  start();
  for (int i = 0; i < 20; ++i) {
    auto client = connect();
    // Ask for lots of output and hang up without reading: the server hits EPIPE/ECONNRESET.
    std::string burst;
    for (int j = 0; j < 200; ++j) burst += R"({"execute":"query-commands"})";
    client->send_raw(burst);
    client->close();
  }
  auto survivor = connect();
  EXPECT_EQ(survivor->execute("query-status")["return"]["running"], true);
  EXPECT_TRUE(wait_until([&] { return server_->client_count() == 1; }));
}

TEST_F(QmpServerTest, StopClosesEveryConnectionAndIsIdempotent) {
  start();
  auto a = connect();
  auto b = connect(false);
  server_->stop();
  server_->stop();
  EXPECT_FALSE(a->read_message(2000));
  EXPECT_TRUE(a->saw_eof());
  EXPECT_FALSE(b->read_message(2000));
  EXPECT_TRUE(b->saw_eof());
  server_->emit_event("STOP");  // harmless after stop
}

}  // namespace
}  // namespace kiln::control
