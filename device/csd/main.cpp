// instinfer-csd: the emulated computational storage drive, as its own process.
//
// It serves the shared-memory queue pairs of queue_pair.hpp: either a memfd handed over by the
// host that started it (--shm-fd, the default path of the csd: backend), or a named POSIX shared
// memory object it creates with mode 0600 for hosts to attach to (--name).
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "drive.hpp"
#include "instinfer/csd/queue_pair.hpp"

using namespace instinfer;
using namespace instinfer::csd;

namespace {

std::atomic<bool> g_stop{false};
void on_signal(int) {
  g_stop.store(true);
}

void usage() {
  std::fprintf(stderr,
               "usage: instinfer-csd (--shm-fd FD | --name NAME) [options]\n"
               "  --flash PATH|ram       flash backing (default ram)    --buffered   allow non-O_DIRECT files\n"
               "  --cores N (4)          attention worker threads        --buffer-mb N (512) group buffer\n"
               "  --channels N (8) --dies N (8) --blocks-per-die N (64) --pages-per-block N (256) --page BYTES (4096)\n"
               "  --channel-gbps X (1.4) --read-us X (20) --program-us X (200) --erase-us X (2000)\n"
               "  --link-gbps X (7) --link-us X (2)\n"
               "  --queue-pairs N (1) --depth N (64) --data-bytes N (16M)\n"
               "  --parent-pid PID       exit when that process exits\n"
               "  --debug-attend-delay-ms N   test seam\n");
}

bool parse_u64(const char* s, uint64_t& out) {
  char* end = nullptr;
  errno = 0;
  const unsigned long long v = std::strtoull(s, &end, 10);
  if (errno != 0 || end == s || *end != '\0') return false;
  out = v;
  return true;
}
bool parse_f64(const char* s, double& out) {
  char* end = nullptr;
  out = std::strtod(s, &end);
  return end != s && *end == '\0';
}

bool process_alive(int32_t pid) {
  return pid > 0 && (::kill(pid, 0) == 0 || errno == EPERM);
}

}  // namespace

int main(int argc, char** argv) {
  drive_options o;
  int shm_fd = -1;
  std::string name;
  region_layout layout{1, 64, 16ull << 20};
  int64_t parent = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    auto need = [&](uint64_t& v) {
      if (i + 1 >= argc || !parse_u64(argv[++i], v)) {
        std::fprintf(stderr, "instinfer-csd: %s needs an unsigned integer\n", argv[i - 1]);
        std::exit(2);
      }
    };
    auto needf = [&](double& v) {
      if (i + 1 >= argc || !parse_f64(argv[++i], v)) {
        std::fprintf(stderr, "instinfer-csd: %s needs a number\n", argv[i - 1]);
        std::exit(2);
      }
    };
    uint64_t u = 0;
    if (a == "--shm-fd")
      need(u), shm_fd = static_cast<int>(u);
    else if (a == "--name" && i + 1 < argc)
      name = argv[++i];
    else if (a == "--flash" && i + 1 < argc) {
      const std::string p = argv[++i];
      o.flash_path = p == "ram" ? "" : p;
    } else if (a == "--buffered")
      o.allow_buffered = true;
    else if (a == "--cores")
      need(u), o.n_cores = static_cast<uint32_t>(u);
    else if (a == "--buffer-mb")
      need(u), o.buffer_bytes = u << 20;
    else if (a == "--channels")
      need(u), o.flash.channels = static_cast<uint32_t>(u);
    else if (a == "--dies")
      need(u), o.flash.dies_per_channel = static_cast<uint32_t>(u);
    else if (a == "--blocks-per-die")
      need(u), o.flash.blocks_per_die = static_cast<uint32_t>(u);
    else if (a == "--pages-per-block")
      need(u), o.flash.pages_per_block = static_cast<uint32_t>(u);
    else if (a == "--page")
      need(u), o.flash.page_bytes = static_cast<uint32_t>(u);
    else if (a == "--channel-gbps")
      needf(o.flash.channel_gbps);
    else if (a == "--read-us")
      needf(o.flash.read_us);
    else if (a == "--program-us")
      needf(o.flash.program_us);
    else if (a == "--erase-us")
      needf(o.flash.erase_us);
    else if (a == "--link-gbps")
      needf(o.link.gbps);
    else if (a == "--link-us")
      needf(o.link.command_us);
    else if (a == "--queue-pairs")
      need(u), layout.n_queue_pairs = static_cast<uint32_t>(u);
    else if (a == "--depth")
      need(u), layout.depth = static_cast<uint32_t>(u);
    else if (a == "--data-bytes")
      need(u), layout.data_bytes = u;
    else if (a == "--parent-pid")
      need(u), parent = static_cast<int64_t>(u);
    else if (a == "--debug-attend-delay-ms")
      need(u), o.debug_attend_delay_ms = static_cast<uint32_t>(u);
    else if (a == "--help" || a == "-h")
      return usage(), 0;
    else {
      std::fprintf(stderr, "instinfer-csd: unknown argument '%s'\n", argv[i]);
      usage();
      return 2;
    }
  }
  if ((shm_fd < 0) == name.empty()) {
    std::fprintf(stderr, "instinfer-csd: give exactly one of --shm-fd and --name\n");
    return 2;
  }
  if (!layout.valid()) {
    std::fprintf(stderr,
                 "instinfer-csd: bad queue layout (queue pairs 1..64, depth a power of two 2..4096, "
                 "data bytes a multiple of 4096)\n");
    return 2;
  }
  if (parent > 0) {
    // Spawned by a host: die with it.
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) return 3;
  }
  std::signal(SIGTERM, on_signal);
  std::signal(SIGINT, on_signal);

  auto d = drive::create(o);
  if (!d.ok()) {
    std::fprintf(stderr, "instinfer-csd: %s\n", d.error().to_string().c_str());
    return 1;
  }
  drive& dev = **d;

  std::string shm_name;
  if (!name.empty()) {
    shm_name = "/instinfer-csd-" + name;
    shm_fd = ::shm_open(shm_name.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
    if (shm_fd < 0) {
      std::fprintf(stderr, "instinfer-csd: shm_open %s: %s\n", shm_name.c_str(), std::strerror(errno));
      return 1;
    }
    if (::ftruncate(shm_fd, static_cast<off_t>(layout.total_bytes())) != 0) {
      std::fprintf(stderr, "instinfer-csd: cannot size shared memory: %s\n", std::strerror(errno));
      ::shm_unlink(shm_name.c_str());
      return 1;
    }
  } else {
    struct stat st {};
    if (::fstat(shm_fd, &st) != 0 || static_cast<uint64_t>(st.st_size) < layout.total_bytes()) {
      std::fprintf(stderr, "instinfer-csd: shared memory fd %d is missing or smaller than the layout\n", shm_fd);
      return 1;
    }
  }
  void* map = ::mmap(nullptr, layout.total_bytes(), PROT_READ | PROT_WRITE, MAP_SHARED, shm_fd, 0);
  if (map == MAP_FAILED) {
    std::fprintf(stderr, "instinfer-csd: mmap: %s\n", std::strerror(errno));
    if (!shm_name.empty()) ::shm_unlink(shm_name.c_str());
    return 1;
  }
  auto* base = static_cast<std::byte*>(map);
  auto* hdr = new (base) region_header();
  hdr->version = kProtocolVersion;
  hdr->n_queue_pairs = layout.n_queue_pairs;
  hdr->depth = layout.depth;
  hdr->data_bytes = layout.data_bytes;
  hdr->qp_stride = layout.qp_stride();
  hdr->total_bytes = layout.total_bytes();
  std::vector<qp_view> qps;
  std::vector<uint32_t> known_gen(layout.n_queue_pairs, 0);
  for (uint32_t q = 0; q < layout.n_queue_pairs; ++q) {
    qp_view v = qp_view::at(base, layout, q);
    if (!name.empty()) new (v.control) qp_control();  // spawned: the host already claimed qp 0
    known_gen[q] = v.control->generation.load();
    qps.push_back(v);
  }
  hdr->device_pid.store(static_cast<int32_t>(::getpid()));
  hdr->magic = kRegionMagic;
  hdr->device_ready.store(1, std::memory_order_release);

  uint64_t idle_spins = 0;
  uint64_t loops = 0;
  bool shutdown = false;
  while (!g_stop.load(std::memory_order_relaxed) && !shutdown) {
    bool worked = false;
    hdr->heartbeat.fetch_add(1, std::memory_order_relaxed);
    for (uint32_t q = 0; q < layout.n_queue_pairs && !shutdown; ++q) {
      qp_view& v = qps[q];
      const int32_t owner = v.control->owner_pid.load(std::memory_order_acquire);
      const uint32_t gen = v.control->generation.load(std::memory_order_acquire);
      if (gen != known_gen[q]) {  // a new client claimed the queue pair: forget the old one's namespaces
        dev.drop_queue_pair(q);
        known_gen[q] = gen;
      }
      if (owner == 0) continue;
      if ((loops & 1023) == 0 && !process_alive(owner)) {  // the client died without releasing
        dev.drop_queue_pair(q);
        v.control->owner_pid.store(0, std::memory_order_release);
        continue;
      }
      uint32_t head = v.control->sq_head.load(std::memory_order_relaxed);
      const uint32_t tail = v.control->sq_tail.load(std::memory_order_acquire);
      if (tail - head > layout.depth) {  // a corrupt doorbell: drop what is there, keep serving
        v.control->sq_head.store(tail, std::memory_order_release);
        continue;
      }
      while (head != tail) {
        if (v.control->cq_tail.load(std::memory_order_relaxed) - v.control->cq_head.load(std::memory_order_acquire) >=
            layout.depth)
          break;                                       // the host has not consumed completions: no room
        const sq_entry e = v.sq[head % layout.depth];  // snapshot: the host cannot change it under us
        command_outcome r = dev.execute(q, e, v.data, v.data_bytes);
        if (r.cqe.status != 0) {
          error_record& er = v.errors[e.cid % layout.depth];
          er.cid = e.cid;
          er.status = r.cqe.status;
          std::snprintf(er.text, sizeof er.text, "%s", r.error.c_str());
        }
        ++head;
        v.control->sq_head.store(head, std::memory_order_release);
        const uint32_t ct = v.control->cq_tail.load(std::memory_order_relaxed);
        v.cq[ct % layout.depth] = r.cqe;
        v.control->cq_tail.store(ct + 1, std::memory_order_seq_cst);
        if (v.control->host_waiting.load(std::memory_order_seq_cst)) futex_wake_all(&v.control->cq_tail);
        worked = true;
        if (r.shutdown) {
          shutdown = true;
          break;
        }
      }
    }
    ++loops;
    if (worked) {
      idle_spins = 0;
      continue;
    }
    if (++idle_spins < 2000) {
      std::this_thread::yield();
      continue;
    }
    // Sleep until a doorbell (or 50 ms, to check clients and signals).
    hdr->device_sleeping.store(1, std::memory_order_seq_cst);
    const uint32_t bell = hdr->doorbell.load(std::memory_order_seq_cst);
    bool pending = false;
    for (const qp_view& v : qps)
      if (v.control->owner_pid.load() != 0 && v.control->sq_tail.load() != v.control->sq_head.load()) pending = true;
    if (!pending) futex_wait(&hdr->doorbell, bell, 50'000'000);
    hdr->device_sleeping.store(0, std::memory_order_seq_cst);
    loops |= 1023;  // check owners after a sleep
    ++loops;
  }
  hdr->device_ready.store(2, std::memory_order_release);
  for (const qp_view& v : qps) futex_wake_all(&v.control->cq_tail);
  if (!shm_name.empty()) ::shm_unlink(shm_name.c_str());
  return 0;
}
