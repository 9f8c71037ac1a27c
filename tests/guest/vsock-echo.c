// vsock-echo PORT: the guest end of kiln's vsock test. Listens on AF_VSOCK port PORT, serves
// one connection by sending every byte back until the peer shuts its side down, then exits.
// Built static into the fixture initramfs (busybox has no vsock tool).
#include <linux/vm_sockets.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

static int write_all(int fd, const char* p, size_t n) {
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w <= 0) return -1;
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

int main(int argc, char** argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: vsock-echo PORT\n");
    return 2;
  }
  int listener = socket(AF_VSOCK, SOCK_STREAM, 0);
  struct sockaddr_vm addr = {.svm_family = AF_VSOCK,
                             .svm_cid = VMADDR_CID_ANY,
                             .svm_port = (unsigned)atoi(argv[1])};
  if (listener < 0 || bind(listener, (struct sockaddr*)&addr, sizeof(addr)) < 0 ||
      listen(listener, 1) < 0) {
    perror("vsock-echo: listen");
    return 1;
  }
  printf("vsock-echo: listening\n");
  fflush(stdout);
  int fd = accept(listener, NULL, NULL);
  if (fd < 0) {
    perror("vsock-echo: accept");
    return 1;
  }
  static char buffer[65536];
  unsigned long long total = 0;
  ssize_t n;
  while ((n = read(fd, buffer, sizeof(buffer))) > 0) {
    if (write_all(fd, buffer, (size_t)n) < 0) {
      perror("vsock-echo: write");
      return 1;
    }
    total += (unsigned long long)n;
  }
  shutdown(fd, SHUT_WR);
  printf("vsock-echo: echoed %llu bytes\n", total);
  close(fd);
  return 0;
}
