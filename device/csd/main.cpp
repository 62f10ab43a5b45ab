// instinfer-csd: the emulated computational storage drive, as its own process.
//
// It serves the shared-memory queue pairs of queue_pair.hpp: either a memfd handed over by the
// host that started it (--shm-fd, the default path of the csd: backend), or a named POSIX shared
// memory object it creates with mode 0600 for hosts to attach to (--name).
#include <sys/prctl.h>
#include <unistd.h>
#include <atomic>
#include <csignal>
#include <cstdio>

#include "drive.hpp"
#include "drive_cli.hpp"
#include "queue_server.hpp"

using namespace instinfer;
using namespace instinfer::csd;

namespace {

std::atomic<bool> g_stop{false};
void on_signal(int) {
  g_stop.store(true);
}

}  // namespace

int main(int argc, char** argv) {
  process_options o;
  if (auto exit_code = parse_process_options(argc, argv, o)) return *exit_code;
  if (o.parent_pid > 0) {
    // Spawned by a host: die with it.
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != o.parent_pid) return 3;
  }
  std::signal(SIGTERM, on_signal);
  std::signal(SIGINT, on_signal);

  auto dev = drive::create(o.drive);
  if (!dev.ok()) {
    std::fprintf(stderr, "instinfer-csd: %s\n", dev.error().to_string().c_str());
    return 1;
  }
  auto region =
      o.name.empty() ? shared_region::map_fd(o.shm_fd, o.layout) : shared_region::create_named(o.name, o.layout);
  if (!region.ok()) {
    std::fprintf(stderr, "instinfer-csd: %s\n", region.error().message().c_str());
    return 1;
  }
  // A named region is new: nobody holds a queue pair yet. A handed-over one has its host's claim.
  queue_server server(**dev, region->base(), region->layout(), region->named());
  server.publish();
  server.serve(g_stop);
  server.close();
  return 0;
}
