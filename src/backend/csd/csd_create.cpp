// csd: URIs: options, drive start-up (or attachment), and the factory.
#include <unistd.h>

#include <algorithm>
#include <iterator>
#include <string>
#include <vector>

#include "csd_impl.hpp"
#include "instinfer/csd/models.hpp"

namespace instinfer {

using namespace csd;

bool csd_backend::available() noexcept {
  try {
    return !find_device_binary(connection_options{}).empty();
  } catch (...) {
    return false;
  }
}

namespace {

// What a csd: URI asks for, checked.
struct csd_uri_options {
  uint64_t drives = 1, cores = 4, buffer_mb = 512, summary_mb = 1024, data_mb = 16, timeout_ms = 5000, delay_ms = 0;
  // timeout_ms=N given: it bounds a drive's start-up too; otherwise start-up gets the connection's
  // generous default (a drive under qemu-user takes seconds).
  bool start_timeout_given = false;
  flash_params flash{};
  link_params link{};
  std::vector<std::string> attach;  // names of running drives, one per drive; empty: start them
  bool keep = false;                // keep flash files this backend created (default: removed)
  bool persist = false;             // one drive on file flash whose namespace survives (persistence.md)
};

// Drive d's flash file: the URI's path for one drive, PATH.d for several; empty: RAM flash.
std::string flash_path(const backend_uri& uri, uint64_t drives, uint32_t d) {
  if (uri.path.empty()) return {};
  return drives == 1 ? uri.path : uri.path + "." + std::to_string(d);
}

result<csd_uri_options> parse_uri_options(const backend_uri& uri) {
  static const char* const kKnown[] = {"drives",         "cores",
                                       "channels",       "dies",
                                       "channel_gbps",   "read_us",
                                       "program_us",     "erase_us",
                                       "page",           "pages_per_block",
                                       "blocks_per_die", "capacity",
                                       "link_gbps",      "link_us",
                                       "buffer_mb",      "data_mb",
                                       "timeout_ms",     "buffered",
                                       "attach",         "device",
                                       "emulator",       "debug_attend_delay_ms",
                                       "keep",           "persist",
                                       "summary_mb"};
  for (const auto& option : uri.options) {
    const std::string& k = option.first;  // not a structured binding: clang 14 cannot capture those
    if (std::none_of(std::begin(kKnown), std::end(kKnown), [&](const char* n) { return k == n; }))
      return status{errc::kInvalidArgument, "unknown csd: option '" + k + "'"};
  }
  auto u = [&](const char* key, uint64_t fallback) { return uri.option_u64(key, fallback); };
  auto f = [&](const char* key, double fallback) { return uri.option_f64(key, fallback); };
#define INSTINFER_OPT(var, expr)             \
  auto var##_r = (expr);                     \
  if (!var##_r.ok()) return var##_r.error(); \
  const auto var = var##_r.value();
  INSTINFER_OPT(drives, u("drives", 1))
  INSTINFER_OPT(cores, u("cores", 4))
  INSTINFER_OPT(channels, u("channels", 8))
  INSTINFER_OPT(dies, u("dies", 8))
  INSTINFER_OPT(page, u("page", 4096))
  INSTINFER_OPT(ppb, u("pages_per_block", 256))
  INSTINFER_OPT(bpd, u("blocks_per_die", 64))
  INSTINFER_OPT(capacity, u("capacity", 0))
  INSTINFER_OPT(buffer_mb, u("buffer_mb", 512))
  INSTINFER_OPT(summary_mb, u("summary_mb", 1024))
  INSTINFER_OPT(data_mb, u("data_mb", 16))
  INSTINFER_OPT(timeout_ms, u("timeout_ms", 5000))
  INSTINFER_OPT(delay_ms, u("debug_attend_delay_ms", 0))
  INSTINFER_OPT(channel_gbps, f("channel_gbps", 1.4))
  INSTINFER_OPT(read_us, f("read_us", 20))
  INSTINFER_OPT(program_us, f("program_us", 200))
  INSTINFER_OPT(erase_us, f("erase_us", 2000))
  INSTINFER_OPT(link_gbps, f("link_gbps", 7))
  INSTINFER_OPT(link_us, f("link_us", 2))
#undef INSTINFER_OPT
  if (drives == 0 || drives > 64) return status{errc::kInvalidArgument, "drives must be in [1, 64]"};
  if (data_mb == 0 || data_mb > 4096) return status{errc::kInvalidArgument, "data_mb must be in [1, 4096]"};
  if (summary_mb > (1ull << 30)) return status{errc::kInvalidArgument, "summary_mb must be at most 2^30"};
  if (timeout_ms == 0 || timeout_ms > 3600000)
    return status{errc::kInvalidArgument, "timeout_ms must be in [1, 3600000]"};
  flash_params fp{};
  fp.channels = static_cast<uint32_t>(std::min<uint64_t>(channels, UINT32_MAX));
  fp.dies_per_channel = static_cast<uint32_t>(std::min<uint64_t>(dies, UINT32_MAX));
  fp.page_bytes = static_cast<uint32_t>(std::min<uint64_t>(page, UINT32_MAX));
  fp.pages_per_block = static_cast<uint32_t>(std::min<uint64_t>(ppb, UINT32_MAX));
  fp.blocks_per_die = static_cast<uint32_t>(std::min<uint64_t>(bpd, UINT32_MAX));
  fp.channel_gbps = channel_gbps;
  fp.read_us = read_us;
  fp.program_us = program_us;
  fp.erase_us = erase_us;
  if (capacity != 0) {
    const uint64_t per_block = uint64_t{fp.page_bytes} * fp.pages_per_block * std::max<uint64_t>(fp.lanes(), 1);
    fp.blocks_per_die = static_cast<uint32_t>(std::max<uint64_t>(1, capacity / std::max<uint64_t>(per_block, 1)));
  }
  INSTINFER_TRY(fp.validate());
  link_params lp{link_gbps, link_us};
  INSTINFER_TRY(lp.validate());

  std::vector<std::string> attach_names;
  if (auto a = uri.option("attach"); a && !a->empty()) {
    std::string_view rest = *a;
    while (!rest.empty()) {
      const size_t comma = rest.find(',');
      attach_names.emplace_back(rest.substr(0, comma));
      if (comma == std::string_view::npos) break;
      rest = rest.substr(comma + 1);
    }
    if (attach_names.size() != drives)
      return status{errc::kInvalidArgument, "attach= names " + std::to_string(attach_names.size()) +
                                                " drives, drives=" + std::to_string(drives)};
  }

  csd_uri_options o;
  o.drives = drives;
  o.cores = cores;
  o.buffer_mb = buffer_mb;
  o.summary_mb = summary_mb;
  o.data_mb = data_mb;
  o.timeout_ms = timeout_ms;
  o.start_timeout_given = uri.option("timeout_ms").has_value();
  o.delay_ms = delay_ms;
  o.flash = fp;
  o.link = lp;
  o.attach = std::move(attach_names);
  o.keep = uri.option_bool("keep", false);
  if (!o.attach.empty() && !uri.path.empty())
    return status{errc::kInvalidArgument, "csd: an attached drive has its own flash; give no path with attach="};
  o.persist = uri.option_bool("persist", false);
  if (o.persist && (uri.path.empty() || !o.attach.empty() || o.drives != 1))
    return status{errc::kUnsupported,
                  "csd: persist=1 needs one drive (drives=1) started on a flash file (csd:PATH?persist=1): the "
                  "metadata lives beside that file, and a commit across several drives would not be atomic"};
  return o;
}

// How to reach drive d: attach to a running one, or start one with the URI's flash and models.
connection_options connection_for(const backend_uri& uri, const csd_uri_options& o, uint32_t d,
                                  const io::storage_file* flash_file) {
  connection_options co;
  co.timeout_ms = static_cast<uint32_t>(o.timeout_ms);
  if (o.start_timeout_given) co.start_timeout_ms = static_cast<uint32_t>(o.timeout_ms);
  co.layout.data_bytes = o.data_mb << 20;
  if (auto dev = uri.option("device")) co.device_path = std::string(*dev);
  if (auto em = uri.option("emulator")) co.emulator = std::string(*em);
  if (!o.attach.empty()) {
    co.attach = o.attach[d];
  } else {
    std::string flash = flash_path(uri, o.drives, d);
    if (flash.empty()) flash = "ram";
    if (flash_file) {
      co.flash_fd = flash_file->fd;
      co.flash_lock_fd = flash_file->lock_fd;
    }
    co.device_args = {"--flash",
                      flash,
                      "--cores",
                      std::to_string(o.cores),
                      "--channels",
                      std::to_string(o.flash.channels),
                      "--dies",
                      std::to_string(o.flash.dies_per_channel),
                      "--blocks-per-die",
                      std::to_string(o.flash.blocks_per_die),
                      "--pages-per-block",
                      std::to_string(o.flash.pages_per_block),
                      "--page",
                      std::to_string(o.flash.page_bytes),
                      "--channel-gbps",
                      std::to_string(o.flash.channel_gbps),
                      "--read-us",
                      std::to_string(o.flash.read_us),
                      "--program-us",
                      std::to_string(o.flash.program_us),
                      "--erase-us",
                      std::to_string(o.flash.erase_us),
                      "--link-gbps",
                      std::to_string(o.link.gbps),
                      "--link-us",
                      std::to_string(o.link.command_us),
                      "--buffer-mb",
                      std::to_string(o.buffer_mb),
                      "--summary-mb",
                      std::to_string(o.summary_mb)};
    if (uri.option_bool("buffered", false)) co.device_args.push_back("--buffered");
    if (o.delay_ms)
      co.device_args.insert(co.device_args.end(), {"--debug-attend-delay-ms", std::to_string(o.delay_ms)});
  }
  return co;
}

}  // namespace

result<std::unique_ptr<csd_backend>> csd_backend::create(const backend_uri& uri) {
  if (uri.scheme != kScheme) return status{errc::kInvalidArgument, "not a csd: URI"};
  auto parsed = parse_uri_options(uri);
  if (!parsed.ok()) return parsed.error();
  const csd_uri_options& o = *parsed;
  auto p = std::make_unique<impl>();
  p->keep_flash = o.keep || o.persist;  // a persistent store's files outlive the cache
  p->persist = o.persist;
  // The host opens each drive's flash file and hands the descriptors (I/O and lock) over: the file
  // is created here (0600, no symbolic link followed), its exclusive lock is taken here (kBusy from
  // another cache reaches the caller as such, before any drive starts), and the lock, which
  // belongs to the lock descriptor's open file description, is held by the host and its drive
  // together, so it lasts as long as either uses the file and dies with both. Files this backend
  // created go again when it is destroyed, also when creating it fails half-way (impl's
  // destructor, after the drives have exited).
  if (o.attach.empty()) {
    for (uint32_t d = 0; d < o.drives; ++d) {
      const std::string path = flash_path(uri, o.drives, d);
      if (path.empty()) break;
      auto f = io::open_storage_file(path, io::storage_open_options{true, uri.option_bool("buffered", false), true});
      if (!f.ok())
        return status{f.error().code(), "csd: flash of drive " + std::to_string(d) + ": " + f.error().message()};
      // PATH.meta (the drive's committed metadata) belongs to the flash file beside it.
      const std::string meta = path + ".meta";
      if (o.persist && f.value().created) {
        ::unlink(meta.c_str());  // stale: the flash it described is gone
      } else if (!o.persist && ::access(meta.c_str(), F_OK) == 0) {
        return status{errc::kInvalidArgument, "csd: '" + path + "' holds a persistent store ('" + meta +
                                                  "' exists): open it with persist=1, or remove both files to reuse "
                                                  "the path"};
      }
      p->flash_files.push_back(std::move(f.value()));
    }
  }
  for (uint32_t d = 0; d < o.drives; ++d) {
    const io::storage_file* flash = d < p->flash_files.size() ? &p->flash_files[d] : nullptr;
    auto c = connection::open(connection_for(uri, o, d, flash));
    if (!c.ok()) return c.error();
    csd_drive_slot slot;
    slot.conn = std::move(*c);
    p->drives.push_back(std::move(slot));
  }
  p->page_bytes = p->drives.front().conn->identity().page_bytes;
  for (const auto& d : p->drives)
    if (d.conn->identity().page_bytes != p->page_bytes)
      return status{errc::kInvalidArgument, "the drives have different flash page sizes"};
  return std::unique_ptr<csd_backend>(new csd_backend(std::move(p)));
}

result<std::unique_ptr<backend>> make_csd_backend(const backend_uri& uri) {
  auto b = csd_backend::create(uri);
  if (!b.ok()) return b.error();
  return std::unique_ptr<backend>(std::move(*b));
}

}  // namespace instinfer
