#include "instinfer/io/device_probe.hpp"

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <fstream>
#include <sstream>

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#if INSTINFER_HAVE_LIBNVME
#include <libnvme.h>
#endif

#include "instinfer/layout/page_geometry.hpp"

namespace instinfer {

namespace {

std::string storage_kind_name(storage_kind k) {
  switch (k) {
    case storage_kind::kNvme: return "nvme namespace";
    case storage_kind::kBlockDevice: return "block device";
    case storage_kind::kFile: return "file";
    case storage_kind::kUnknown: return "unknown";
  }
  return "?";
}

bool read_u64(const std::string& file, uint64_t& out) {
  std::ifstream in(file);
  unsigned long long v = 0;
  if (!(in >> v)) return false;
  out = v;
  return true;
}

uint32_t round_up_pow2(uint64_t v) {
  uint64_t p = 1;
  while (p < v) p <<= 1;
  return static_cast<uint32_t>(std::min<uint64_t>(p, UINT32_MAX));
}

std::string kib(uint64_t bytes) {
  if (bytes >= (1u << 20) && bytes % (1u << 20) == 0) return std::to_string(bytes >> 20) + " MiB";
  if (bytes >= 1024 && bytes % 1024 == 0) return std::to_string(bytes >> 10) + " KiB";
  return std::to_string(bytes) + " B";
}

#if INSTINFER_HAVE_LIBNVME
void probe_nvme(const std::string& ns_name, device_probe_result& r) {
  const std::string dev = "/dev/" + ns_name;
  const int fd = ::open(dev.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    r.reasons.push_back("nvme: cannot open " + dev + " (" + std::strerror(errno) +
                        "): namespace fields unavailable, using the block queue limits");
    return;
  }
  __u32 nsid = 0;
  nvme_id_ns ns{};
  nvme_id_ctrl ctrl{};
  if (nvme_get_nsid(fd, &nsid) != 0 || nvme_identify_ns(fd, nsid, &ns) != 0) {
    r.reasons.push_back("nvme: identify namespace failed on " + dev + " (" + std::strerror(errno) + ")");
    ::close(fd);
    return;
  }
  r.nvme_identified = true;
  const unsigned fmt = (ns.flbas & 0x0f) | (((ns.flbas >> 5) & 0x3) << 4);
  const unsigned ds = ns.lbaf[fmt].ds;
  r.nvme_lba_bytes = ds >= 9 && ds < 32 ? (1u << ds) : 0;
  const uint32_t lba = r.nvme_lba_bytes;
  r.reasons.push_back("nvme: namespace " + std::to_string(nsid) + ", LBA format " + std::to_string(fmt) + " = " +
                      std::to_string(lba) + " B");
  if (lba && (ns.nsfeat & NVME_NS_FEAT_IO_OPT)) {
    // 0-based counts of logical blocks.
    r.nvme_npwg_bytes = (static_cast<uint32_t>(le16toh(ns.npwg)) + 1) * lba;
    r.nvme_npwa_bytes = (static_cast<uint32_t>(le16toh(ns.npwa)) + 1) * lba;
    r.nvme_nows_bytes = (static_cast<uint32_t>(le16toh(ns.nows)) + 1) * lba;
    r.reasons.push_back("nvme: NPWG " + kib(r.nvme_npwg_bytes) + ", NPWA " + kib(r.nvme_npwa_bytes) + ", NOWS " +
                        kib(r.nvme_nows_bytes) + " (NSFEAT.OPTPERF set)");
  } else {
    r.reasons.push_back("nvme: NSFEAT.OPTPERF clear: NPWG/NPWA/NOWS not reported");
  }
  if (lba && le16toh(ns.noiob)) {
    r.nvme_noiob_bytes = static_cast<uint32_t>(le16toh(ns.noiob)) * lba;
    r.reasons.push_back("nvme: NOIOB " + kib(r.nvme_noiob_bytes) + " (avoid I/O crossing this boundary)");
  }
  if (nvme_identify_ctrl(fd, &ctrl) == 0) {
    if (ctrl.mdts) {
      // MDTS is in units of the minimum memory page size (CAP.MPSMIN); 4 KiB on practically every drive.
      r.nvme_mdts_bytes = 4096ull << ctrl.mdts;
      r.reasons.push_back("nvme: MDTS 2^" + std::to_string(ctrl.mdts) + " x 4 KiB = " + kib(r.nvme_mdts_bytes));
    } else {
      r.reasons.push_back("nvme: MDTS 0 (no transfer limit)");
    }
  }
  ::close(fd);
}
#endif

}  // namespace

uint32_t choose_page_bytes(uint32_t write_granularity, uint64_t max_transfer, std::vector<std::string>* reasons) {
  auto say = [&](std::string s) {
    if (reasons) reasons->push_back(std::move(s));
  };
  const uint32_t floor = page_geometry::kDefaultPageBytes;  // 4 KiB: the paper's group for 128 x f16
  uint32_t page = floor;
  if (write_granularity > floor) {
    page = round_up_pow2(write_granularity);
    say("page: raised to " + kib(page) + " to be a multiple of the write granularity " + kib(write_granularity));
  } else {
    say("page: 4 KiB (write granularity " + (write_granularity ? kib(write_granularity) : std::string("unknown")) +
        " divides it)");
  }
  if (page % std::max<uint32_t>(write_granularity, 1) != 0)
    say("page: write granularity " + kib(write_granularity) + " is not a power of two; " + kib(page) +
        " is the nearest page size above it and writes will not align exactly");
  if (page > page_geometry::kMaxPageBytes) {
    page = page_geometry::kMaxPageBytes;
    say("page: capped at " + kib(page) + " (largest page the layout supports)");
  }
  if (max_transfer && page > max_transfer) {
    uint32_t p = floor;
    while (uint64_t{p} * 2 <= max_transfer && p * 2 <= page) p *= 2;
    say("page: lowered to " + kib(p) + " to fit in one transfer (max " + kib(max_transfer) + ")");
    page = p;
  }
  return page;
}

result<device_probe_result> probe_device(const std::string& path) {
  if (path.empty()) return status{errc::kInvalidArgument, "probe: empty path"};
  device_probe_result r;
  r.path = path;
  struct stat st {};
  std::string target = path;
  if (::stat(target.c_str(), &st) != 0) {
    // A file that does not exist yet: describe the directory that will hold it.
    const size_t slash = path.find_last_of('/');
    target = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
    if (::stat(target.c_str(), &st) != 0)
      return status{errc::kInvalidArgument, "probe: neither '" + path + "' nor its directory exists"};
    r.reasons.push_back("'" + path + "' does not exist yet: probing its directory '" + target + "'");
  }
  const bool is_blk = S_ISBLK(st.st_mode);
  const dev_t dev = is_blk ? st.st_rdev : st.st_dev;
  r.kind = is_blk ? storage_kind::kBlockDevice : storage_kind::kFile;

  // statx: the direct-I/O alignment the kernel enforces for this file.
  struct statx sx {};
  int stx_rc = -1;
  if (S_ISDIR(st.st_mode)) {
    // Directories report no DIO alignment: ask an unnamed temporary file in it instead.
    const int tfd = ::open(target.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (tfd >= 0) {
      stx_rc = ::statx(tfd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &sx);
      ::close(tfd);
    }
  } else {
    stx_rc = ::statx(AT_FDCWD, target.c_str(), 0, STATX_DIOALIGN, &sx);
  }
  if (stx_rc == 0 && (sx.stx_mask & STATX_DIOALIGN)) {
    r.dio_mem_align = sx.stx_dio_mem_align;
    r.dio_offset_align = sx.stx_dio_offset_align;
    if (r.dio_offset_align == 0)
      r.reasons.push_back("statx: direct I/O not supported here (DIOALIGN 0): only buffered=1 would work");
    else
      r.reasons.push_back("statx: direct I/O needs " + std::to_string(r.dio_mem_align) + " B buffer and " +
                          std::to_string(r.dio_offset_align) + " B offset alignment");
  } else {
    r.reasons.push_back("statx: STATX_DIOALIGN not reported (directory, old kernel or filesystem)");
  }

  // sysfs: the block device behind it (a partition's limits live on its parent disk).
  const std::string sys = "/sys/dev/block/" + std::to_string(major(dev)) + ":" + std::to_string(minor(dev));
  char link[PATH_MAX] = {};
  const ssize_t n = ::readlink(sys.c_str(), link, sizeof link - 1);
  if (n > 0) {
    std::string name(link, static_cast<size_t>(n));
    name = name.substr(name.find_last_of('/') + 1);
    r.block_device = name;
    std::string queue = sys + "/queue/";
    uint64_t part = 0;
    if (read_u64(sys + "/partition", part)) queue = sys + "/../queue/";
    uint64_t v = 0;
    if (read_u64(queue + "logical_block_size", v)) r.logical_block_bytes = static_cast<uint32_t>(v);
    if (read_u64(queue + "physical_block_size", v)) r.physical_block_bytes = static_cast<uint32_t>(v);
    if (read_u64(queue + "minimum_io_size", v)) r.minimum_io_bytes = static_cast<uint32_t>(v);
    if (read_u64(queue + "optimal_io_size", v)) r.optimal_io_bytes = static_cast<uint32_t>(v);
    if (read_u64(queue + "max_sectors_kb", v)) r.max_transfer_bytes = v * 1024;
    if (read_u64(queue + "rotational", v)) r.rotational = v != 0;
    if (read_u64(queue + "io_poll", v)) r.poll_queues = v != 0;
    r.filesystem_note = is_blk ? "block device " + name : "file on block device " + name;
    r.reasons.push_back("sysfs " + name + ": logical " + std::to_string(r.logical_block_bytes) + " B, physical " +
                        std::to_string(r.physical_block_bytes) + " B, minimum I/O " +
                        std::to_string(r.minimum_io_bytes) + " B, optimal I/O " +
                        (r.optimal_io_bytes ? std::to_string(r.optimal_io_bytes) + " B" : std::string("not set")) +
                        ", max transfer " + kib(r.max_transfer_bytes) + (r.rotational ? ", rotational" : "") +
                        (r.poll_queues ? ", poll queues" : ", no poll queues (IOPOLL falls back)"));
    if (name.rfind("nvme", 0) == 0) {
      r.kind = storage_kind::kNvme;
      // nvme0n1p2 -> nvme0n1
      std::string ns = name;
      const size_t p = ns.find('p', 4);
      if (p != std::string::npos) ns = ns.substr(0, p);
#if INSTINFER_HAVE_LIBNVME
      probe_nvme(ns, r);
#else
      r.reasons.push_back("nvme: built without libnvme: namespace fields unavailable");
#endif
    }
  } else {
    r.filesystem_note = "no block device (virtual or network filesystem, device " + std::to_string(major(dev)) + ":" +
                        std::to_string(minor(dev)) + ")";
    r.reasons.push_back("sysfs: no block device behind '" + target + "'");
  }

  // The write granularity: the largest unit the device prefers writes to be a multiple of.
  uint32_t g = std::max({r.logical_block_bytes, r.physical_block_bytes, r.minimum_io_bytes, r.dio_offset_align,
                         r.nvme_lba_bytes, r.nvme_npwg_bytes});
  uint64_t max_transfer = r.max_transfer_bytes;
  if (r.nvme_mdts_bytes && (!max_transfer || r.nvme_mdts_bytes < max_transfer)) max_transfer = r.nvme_mdts_bytes;
  r.write_granularity_bytes = g;
  r.page_bytes = choose_page_bytes(g, max_transfer, &r.reasons);
  return r;
}

std::string device_probe_result::report() const {
  std::ostringstream o;
  o << "path:               " << path << "\n";
  o << "kind:               " << storage_kind_name(kind)
    << (filesystem_note.empty() ? "" : " (" + filesystem_note + ")") << "\n";
  o << "dio alignment:      memory " << dio_mem_align << " B, offset " << dio_offset_align << " B\n";
  o << "logical block:      " << logical_block_bytes << " B\n";
  o << "physical block:     " << physical_block_bytes << " B\n";
  o << "minimum I/O:        " << minimum_io_bytes << " B\n";
  o << "optimal I/O:        " << optimal_io_bytes << " B\n";
  o << "max transfer:       " << max_transfer_bytes << " B\n";
  o << "poll queues:        " << (poll_queues ? "yes" : "no") << "\n";
  if (nvme_identified) {
    o << "nvme LBA:           " << nvme_lba_bytes << " B\n";
    o << "nvme NPWG/NPWA:     " << nvme_npwg_bytes << " / " << nvme_npwa_bytes << " B\n";
    o << "nvme NOWS:          " << nvme_nows_bytes << " B\n";
    o << "nvme NOIOB:         " << nvme_noiob_bytes << " B\n";
    o << "nvme MDTS:          " << nvme_mdts_bytes << " B\n";
  }
  o << "write granularity:  " << write_granularity_bytes << " B\n";
  o << "default page bytes: " << page_bytes << "\n";
  o << "why:\n";
  for (const auto& s : reasons) o << "  - " << s << "\n";
  return o.str();
}

}  // namespace instinfer
