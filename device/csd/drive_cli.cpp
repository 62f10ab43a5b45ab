#include "drive_cli.hpp"

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <type_traits>
#include <variant>

namespace instinfer::csd {

namespace {

void usage() {
  std::fprintf(
      stderr,
      "usage: instinfer-csd (--shm-fd FD | --name NAME) [options]\n"
      "  --flash PATH|ram       flash backing (default ram)    --buffered   allow non-O_DIRECT files\n"
      "  --flash-fd FD          the --flash PATH, opened by the host that starts the drive\n"
      "  --flash-lock-fd FD     with --flash-fd: the descriptor holding the file's lock\n"
      "  --keep-flash           keep a flash file the drive created (default: removed at exit)\n"
      "  --cores N (4)          attention worker threads        --buffer-mb N (512) group buffer\n"
      "  --summary-mb N (1024)  DRAM for page summaries, every namespace (0: none kept)\n"
      "  --channels N (8) --dies N (8) --blocks-per-die N (64) --pages-per-block N (256) --page BYTES (4096)\n"
      "  --channel-gbps X (1.4) --read-us X (20) --program-us X (200) --erase-us X (2000)\n"
      "  --link-gbps X (7) --link-us X (2)\n"
      "  modelled cores: --model-cores N (4) --model-ghz X (1.5) --model-flops-per-cycle X (8) --model-eff X (1)\n"
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

// A numeric option: where its value goes (scaled by `shift` for sizes given in MiB).
struct numeric_option {
  std::string_view flag;
  std::variant<uint32_t*, uint64_t*, int64_t*, int*, double*> target;
  unsigned shift = 0;
};

bool store(const numeric_option& opt, const char* text) {
  if (auto* d = std::get_if<double*>(&opt.target)) return parse_f64(text, **d);
  uint64_t u = 0;
  if (!parse_u64(text, u)) return false;
  u <<= opt.shift;
  std::visit([&](auto* p) { *p = static_cast<std::remove_pointer_t<decltype(p)>>(u); }, opt.target);
  return true;
}

// INSTINFER_CSD_FAULT=read:N[:COUNT] or program:N[:COUNT] (test seam, docs/csd.md): the drive's
// N-th flash page read or program, and the COUNT - 1 after it, fail with an I/O error. An
// environment variable, not an option: hosts pass their environment to the drives they start, so
// a test reaches a drive it starts through the csd: backend without a URI option for it.
bool parse_fault(const char* text, flash_fault& f) {
  const std::string_view s = text;
  const size_t colon = s.find(':');
  if (colon == std::string_view::npos) return false;
  const std::string_view what = s.substr(0, colon);
  if (what == "read")
    f.op = flash_fault::kind::kRead;
  else if (what == "program")
    f.op = flash_fault::kind::kProgram;
  else
    return false;
  std::string rest(s.substr(colon + 1));
  const size_t second = rest.find(':');
  if (second != std::string::npos) {
    if (!parse_u64(rest.c_str() + second + 1, f.count) || f.count == 0) return false;
    rest.resize(second);
  }
  return parse_u64(rest.c_str(), f.nth) && f.nth > 0;
}

}  // namespace

std::optional<int> parse_process_options(int argc, char** argv, process_options& o) {
  drive_options& d = o.drive;
  const numeric_option numeric[] = {
      {"--shm-fd", &o.shm_fd},
      {"--flash-fd", &d.flash_fd},
      {"--flash-lock-fd", &d.flash_lock_fd},
      {"--cores", &d.n_cores},
      {"--buffer-mb", &d.buffer_bytes, 20},
      {"--summary-mb", &d.summary_bytes, 20},
      {"--channels", &d.flash.channels},
      {"--dies", &d.flash.dies_per_channel},
      {"--blocks-per-die", &d.flash.blocks_per_die},
      {"--pages-per-block", &d.flash.pages_per_block},
      {"--page", &d.flash.page_bytes},
      {"--channel-gbps", &d.flash.channel_gbps},
      {"--read-us", &d.flash.read_us},
      {"--program-us", &d.flash.program_us},
      {"--erase-us", &d.flash.erase_us},
      {"--link-gbps", &d.link.gbps},
      {"--link-us", &d.link.command_us},
      {"--model-cores", &d.compute.cores},
      {"--model-ghz", &d.compute.ghz},
      {"--model-flops-per-cycle", &d.compute.flops_per_cycle},
      {"--model-eff", &d.compute.efficiency},
      {"--queue-pairs", &o.layout.n_queue_pairs},
      {"--depth", &o.layout.depth},
      {"--data-bytes", &o.layout.data_bytes},
      {"--parent-pid", &o.parent_pid},
      {"--debug-attend-delay-ms", &d.debug_attend_delay_ms},
  };
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    const numeric_option* opt = nullptr;
    for (const numeric_option& n : numeric)
      if (n.flag == a) opt = &n;
    if (opt) {
      if (i + 1 >= argc || !store(*opt, argv[++i])) {
        const bool real = std::holds_alternative<double*>(opt->target);
        std::fprintf(stderr, "instinfer-csd: %s needs %s\n", opt->flag.data(),
                     real ? "a number" : "an unsigned integer");
        return 2;
      }
    } else if (a == "--name" && i + 1 < argc) {
      o.name = argv[++i];
    } else if (a == "--flash" && i + 1 < argc) {
      const std::string p = argv[++i];
      d.flash_path = p == "ram" ? "" : p;
    } else if (a == "--buffered") {
      d.allow_buffered = true;
    } else if (a == "--keep-flash") {
      d.keep_flash = true;
    } else if (a == "--help" || a == "-h") {
      usage();
      return 0;
    } else {
      std::fprintf(stderr, "instinfer-csd: unknown argument '%s'\n", argv[i]);
      usage();
      return 2;
    }
  }
  if (const char* fault = std::getenv("INSTINFER_CSD_FAULT"); fault && *fault && !parse_fault(fault, d.fault)) {
    std::fprintf(stderr, "instinfer-csd: INSTINFER_CSD_FAULT must be read:N[:COUNT] or program:N[:COUNT], got '%s'\n",
                 fault);
    return 2;
  }
  if (d.flash_lock_fd >= 0 && d.flash_fd < 0) {
    std::fprintf(stderr, "instinfer-csd: --flash-lock-fd needs --flash-fd\n");
    return 2;
  }
  if (d.flash_fd >= 0 && d.flash_path.empty()) {
    std::fprintf(stderr, "instinfer-csd: --flash-fd needs --flash PATH (the file it names)\n");
    return 2;
  }
  if ((o.shm_fd < 0) == o.name.empty()) {
    std::fprintf(stderr, "instinfer-csd: give exactly one of --shm-fd and --name\n");
    return 2;
  }
  if (!o.layout.valid()) {
    std::fprintf(stderr,
                 "instinfer-csd: bad queue layout (queue pairs 1..64, depth a power of two 2..4096, "
                 "data bytes a multiple of 4096)\n");
    return 2;
  }
  return std::nullopt;
}

}  // namespace instinfer::csd
