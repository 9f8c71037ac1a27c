#include "control/qmp_server.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include <array>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <stdexcept>

#include "base/errors.h"

namespace kiln::control {
namespace {

constexpr size_t kReadChunk = 64 * 1024;

bool is_listening(int fd) {
  int type = 0;
  socklen_t len = sizeof(type);
  if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0) throw_errno("QMP fd is no socket");
  if (type != SOCK_STREAM) throw std::invalid_argument("QMP fd is not a stream socket");
  int listening = 0;
  len = sizeof(listening);
  if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) != 0) {
    throw_errno("getsockopt(SO_ACCEPTCONN)");
  }
  return listening != 0;
}

}  // namespace

UniqueFd QmpServer::listen_unix(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path)) {
    throw std::invalid_argument("QMP socket path is empty or too long: " + path);
  }
  std::memcpy(addr.sun_path, path.data(), path.size());

  // A previous kiln that died leaves its socket file behind; bind() would fail on it. Only a
  // socket is removed: anything else at that path is probably a user mistake worth reporting.
  struct stat st {};
  if (lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      errno = EEXIST;
      throw_errno("QMP socket path exists and is not a socket: " + path);
    }
    if (unlink(path.c_str()) != 0) throw_errno("unlink stale QMP socket " + path);
  }

  UniqueFd fd(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd) throw_errno("socket(AF_UNIX)");
  if (bind(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
    throw_errno("bind " + path);
  }
  if (listen(fd.get(), 16) != 0) throw_errno("listen " + path);
  return fd;
}

UniqueFd QmpServer::open_endpoint(std::string_view spec) {
  constexpr std::string_view kUnix = "unix:";
  if (!spec.starts_with(kUnix)) {
    throw std::invalid_argument("QMP endpoint must be unix:PATH[,server=on]: " + std::string(spec));
  }
  spec.remove_prefix(kUnix.size());
  size_t comma = spec.find(',');
  std::string path(spec.substr(0, comma));
  bool server = false;
  while (comma != std::string_view::npos) {
    spec.remove_prefix(comma + 1);
    comma = spec.find(',');
    std::string_view option = spec.substr(0, comma);
    if (option == "server" || option == "server=on") {
      server = true;
    } else if (option == "server=off" || option == "wait=off") {
      // the default
    } else {
      throw std::invalid_argument("unsupported QMP endpoint option: " + std::string(option));
    }
  }
  if (server) return listen_unix(path);

  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path)) {
    throw std::invalid_argument("QMP socket path is empty or too long: " + path);
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  UniqueFd fd(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) throw_errno("socket(AF_UNIX)");
  if (connect(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
    throw_errno("connect " + path);
  }
  return fd;
}

QmpServer::QmpServer(VmControl& vm, UniqueFd socket, QmpServerOptions options)
    : vm_(vm), options_(options) {
  if (!socket) throw std::invalid_argument("QMP server needs a socket");
  wake_fd_ = UniqueFd(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!wake_fd_) throw_errno("eventfd");
  if (is_listening(socket.get())) {
    // accept() must never block the loop, even if another process races us for a connection.
    int flags = fcntl(socket.get(), F_GETFL);
    if (flags < 0 || fcntl(socket.get(), F_SETFL, flags | O_NONBLOCK) != 0) {
      throw_errno("fcntl(O_NONBLOCK)");
    }
    listen_fd_ = std::move(socket);
  } else {
    // Connected sockets are left in their blocking mode (the fd may be shared with a parent);
    // every send/recv passes MSG_DONTWAIT instead.
    add_client(std::move(socket));
  }
}

QmpServer::~QmpServer() {
  stop();
  if (thread_.joinable()) thread_.detach();  // only when destroyed from the server thread
}

void QmpServer::start() {
  if (thread_.joinable() || stopping_) return;
  thread_ = std::thread([this] { run(); });
}

void QmpServer::stop() {
  stopping_ = true;
  uint64_t one = 1;
  [[maybe_unused]] ssize_t n = write(wake_fd_.get(), &one, sizeof(one));
  if (thread_.joinable() && thread_.get_id() != std::this_thread::get_id()) thread_.join();
}

void QmpServer::emit_event(std::string_view name, nlohmann::json data) {
  if (stopping_) return;  // nobody will deliver it; do not let the queue grow
  std::string line = serialize_message(make_event(name, data, std::chrono::system_clock::now()));
  {
    std::lock_guard lock(events_mutex_);
    pending_events_.push_back(std::move(line));
  }
  uint64_t one = 1;
  [[maybe_unused]] ssize_t n = write(wake_fd_.get(), &one, sizeof(one));
}

void QmpServer::run() {
  std::vector<pollfd> fds;
  while (!stopping_) {
    fds.clear();
    fds.push_back({wake_fd_.get(), POLLIN, 0});
    fds.push_back({listen_fd_.valid() ? listen_fd_.get() : -1, POLLIN, 0});
    for (const auto& client : clients_) {
      short events = POLLIN;
      if (!client->output.empty()) events |= POLLOUT;
      fds.push_back({client->fd.get(), events, 0});
    }
    if (poll(fds.data(), fds.size(), -1) < 0) {
      if (errno == EINTR) continue;
      break;  // cannot happen with valid fds; leaving beats spinning
    }
    if (fds[0].revents & POLLIN) {
      uint64_t count;
      [[maybe_unused]] ssize_t n = read(wake_fd_.get(), &count, sizeof(count));
    }
    deliver_events();
    // Clients accepted below are appended after the polled ones, so indices stay valid.
    size_t polled = clients_.size();
    for (size_t i = 0; i < polled; ++i) {
      short revents = fds[i + 2].revents;
      Client& client = *clients_[i];
      if (revents & POLLOUT) flush(client);
      if (revents & (POLLIN | POLLHUP | POLLERR)) read_from(client);
    }
    if (fds[1].revents & POLLIN) accept_clients();
    remove_closed_clients();
  }
  // Events emitted before stop() (a VM's last SHUTDOWN) still reach the clients: one last
  // non-blocking flush, so a client that does not read cannot hold the VMM's exit.
  deliver_events();
  for (const auto& client : clients_) flush(*client);
  clients_.clear();
  client_count_ = 0;
}

void QmpServer::accept_clients() {
  while (true) {
    UniqueFd fd(accept4(listen_fd_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
    if (!fd) return;  // EAGAIN, or a transient error (ECONNABORTED, EMFILE): try next wakeup
    if (clients_.size() >= options_.max_clients) continue;  // closes it
    add_client(std::move(fd));
  }
}

void QmpServer::add_client(UniqueFd fd) {
  auto client = std::make_unique<Client>(std::move(fd), vm_, options_.max_input_bytes);
  queue(*client, client->session.greeting());
  clients_.push_back(std::move(client));
  client_count_ = clients_.size();
}

void QmpServer::read_from(Client& client) {
  if (client.closing) return;
  std::array<char, kReadChunk> buffer;
  ssize_t n = recv(client.fd.get(), buffer.data(), buffer.size(), MSG_DONTWAIT);
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return;
  if (n <= 0) {
    client.closing = true;  // EOF or reset: nobody is left to read what we owe them
    return;
  }
  std::vector<JsonStreamSplitter::Item> items;
  client.splitter.feed(std::string_view(buffer.data(), static_cast<size_t>(n)), items);
  for (const auto& item : items) {
    if (client.closing) break;
    handle_item(client, item);
  }
}

void QmpServer::handle_item(Client& client, const JsonStreamSplitter::Item& item) {
  using Kind = JsonStreamSplitter::Item::Kind;
  switch (item.kind) {
    case Kind::kError:
      queue(client, make_error("GenericError", item.text));
      return;
    case Kind::kOverflow:
      // The stream cannot be resynchronised without reading the rest of the oversized value,
      // which is what the limit is there to avoid: answer, then hang up.
      queue(client, make_error("GenericError", "JSON parse error, " + item.text));
      client.closing = true;
      return;
    case Kind::kValue:
      break;
  }
  QmpReply reply = client.session.handle_text(item.text);
  // Events raised by the command itself (STOP for "stop", ...) go out before its reply, as QEMU
  // orders them.
  deliver_events();
  queue(client, reply.message);
  if (reply.quit_after_send) {
    try {
      vm_.quit();
    } catch (const std::exception&) {
      // The client already has its {"return": {}}; nothing left to tell it.
    }
  }
}

void QmpServer::queue(Client& client, const nlohmann::json& message) {
  append(client, serialize_message(message));
}

void QmpServer::append(Client& client, const std::string& line) {
  client.output += line;
  flush(client);
  if (client.output.size() > options_.max_output_bytes) {
    client.output.clear();  // it does not read: drop it rather than let it hold memory or us
    client.closing = true;
  }
}

void QmpServer::flush(Client& client) {
  size_t sent = 0;
  while (sent < client.output.size()) {
    ssize_t n = send(client.fd.get(), client.output.data() + sent, client.output.size() - sent,
                     MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      sent += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
    client.output.clear();  // EPIPE/ECONNRESET: the peer left mid-reply
    client.closing = true;
    return;
  }
  client.output.erase(0, sent);
}

void QmpServer::deliver_events() {
  std::vector<std::string> events;
  {
    std::lock_guard lock(events_mutex_);
    events.swap(pending_events_);
  }
  for (const auto& line : events) {
    for (auto& client : clients_) {
      if (!client->closing && client->session.negotiated()) append(*client, line);
    }
  }
}

void QmpServer::remove_closed_clients() {
  std::erase_if(clients_, [](const auto& client) { return client->closing; });
  client_count_ = clients_.size();
}

}  // namespace kiln::control
