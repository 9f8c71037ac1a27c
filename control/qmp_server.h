// A QMP (QEMU Machine Protocol) server for kiln: speaks QEMU 7.2's wire protocol on a unix socket
// so existing QMP clients (libvirt-style tooling, qmp-shell, scripts) can drive a kiln VM.
//
// The protocol lives in QmpSession; this class only moves bytes. It runs one thread with a poll()
// loop over non-blocking sockets, serves several clients at once, never blocks on a slow client
// (each has a bounded output buffer and is dropped past it) and never raises SIGPIPE.
//
// Usage from the VMM:
//   kiln::control::QmpServer qmp(vm_control, kiln::control::QmpServer::listen_unix(path));
//   // or: QmpServer qmp(vm_control, kiln::UniqueFd(fd_from_qmp_fd_flag));
//   qmp.start();
//   ... qmp.emit_event("STOP");  qmp.emit_event("SHUTDOWN", shutdown_event_data(true, ...));
//   qmp.stop();  // or let the destructor do it
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "base/unique_fd.h"
#include "control/json_stream.h"
#include "control/qmp_session.h"
#include "control/vm_control.h"

namespace kiln::control {

struct QmpServerOptions {
  // A single JSON value larger than this gets an error reply and its client is dropped.
  size_t max_input_bytes = 1 << 20;
  // Replies and events a client has not read yet; past this the client is dropped.
  size_t max_output_bytes = 1 << 20;
  // Connections beyond this are accepted and closed at once.
  size_t max_clients = 16;
};

class QmpServer {
 public:
  // Creates a listening unix stream socket at path. A stale socket left at path is unlinked;
  // any other kind of file there is an error (std::system_error / std::invalid_argument).
  static UniqueFd listen_unix(const std::string& path);

  // Opens the socket for a `--qmp` value in QEMU's chardev syntax, unix only:
  //   "unix:PATH,server[=on][,wait=off]"  listen at PATH (stale socket replaced)
  //   "unix:PATH"                         connect to a listener at PATH (client mode)
  // kiln never waits for the first client before booting, so "wait=on" is refused.
  static UniqueFd open_endpoint(std::string_view spec);

  // socket: a listening stream socket (clients are accepted from it) or an already connected
  // stream socket (served as the only client), e.g. from --qmp-fd N. Takes ownership.
  QmpServer(VmControl& vm, UniqueFd socket, QmpServerOptions options = {});
  ~QmpServer();
  QmpServer(const QmpServer&) = delete;
  QmpServer& operator=(const QmpServer&) = delete;

  // Starts the server thread. (An inherited connected socket already got its greeting from the
  // constructor; nothing is read before start().)
  void start();
  // Stops the thread and closes every connection. Safe to call twice, and from VmControl methods
  // (then it only asks the loop to end; the destructor joins).
  void stop();

  // Queues an event for every client that finished negotiation; thread-safe, never blocks on
  // clients. The timestamp is taken now. data == null leaves "data" out.
  void emit_event(std::string_view name, nlohmann::json data = nullptr);

  size_t client_count() const { return client_count_.load(); }

 private:
  struct Client {
    UniqueFd fd;
    JsonStreamSplitter splitter;
    QmpSession session;
    std::string output;
    bool closing = false;  // drop once output is flushed (or at once if it cannot be)
    Client(UniqueFd f, VmControl& vm, size_t max_input)
        : fd(std::move(f)), splitter(max_input), session(vm) {}
  };

  void run();
  void accept_clients();
  void add_client(UniqueFd fd);
  void read_from(Client& client);
  void handle_item(Client& client, const JsonStreamSplitter::Item& item);
  void queue(Client& client, const nlohmann::json& message);
  void append(Client& client, const std::string& line);
  void flush(Client& client);
  void deliver_events();
  void remove_closed_clients();

  VmControl& vm_;
  QmpServerOptions options_;
  UniqueFd listen_fd_;
  UniqueFd wake_fd_;  // eventfd: emit_event() and stop() poke the loop through it
  std::vector<std::unique_ptr<Client>> clients_;
  std::atomic<size_t> client_count_{0};
  std::atomic<bool> stopping_{false};
  std::thread thread_;

  std::mutex events_mutex_;
  std::vector<std::string> pending_events_;  // serialized, in emit order
};

}  // namespace kiln::control
