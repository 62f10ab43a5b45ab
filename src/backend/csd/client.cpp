#include "instinfer/csd/client.hpp"

#include <dlfcn.h>
#include <fcntl.h>
#include <limits.h>
#include <spawn.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <thread>

extern char** environ;

namespace instinfer::csd {
namespace {

int64_t now_ms() noexcept {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

bool executable(const std::string& p) {
  return !p.empty() && ::access(p.c_str(), X_OK) == 0;
}

std::string dir_of(const std::string& path) {
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? std::string{} : path.substr(0, slash);
}

std::string self_dir() {
  char buf[4096];
  const ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n <= 0) return {};
  return dir_of(std::string(buf, static_cast<size_t>(n)));
}

// The folder of the file holding this code: libinstinfer.so for the C API (also when Python or
// another interpreter loaded it), the executable when the static library was linked into one.
const char kCodeAnchor = 0;
std::string code_dir() {
  Dl_info info{};
  if (::dladdr(&kCodeAnchor, &info) == 0 || info.dli_fname == nullptr || info.dli_fname[0] == '\0') return {};
  char real[PATH_MAX];
  if (::realpath(info.dli_fname, real) == nullptr) return {};
  return dir_of(real);
}

constexpr const char* kBinary = "instinfer-csd";

}  // namespace

std::vector<std::string> device_binary_candidates(const connection_options& o) {
  if (!o.device_path.empty()) return {o.device_path};
  if (const char* env = std::getenv("INSTINFER_CSD_DEVICE"); env && *env) return {env};
  std::vector<std::string> dirs;
  if (const std::string lib = code_dir(); !lib.empty()) {
    dirs.push_back(lib);
    dirs.push_back(lib + "/../libexec");  // an installed tree moved elsewhere (lib/ beside libexec/)
    dirs.push_back(lib + "/../bin");      // the build tree (lib/ beside bin/)
  }
#ifdef INSTINFER_CSD_LIBEXECDIR
  dirs.push_back(INSTINFER_CSD_LIBEXECDIR);  // where `cmake --install` puts the drive
#endif
  if (const std::string exe = self_dir(); !exe.empty()) {
    dirs.push_back(exe);
    dirs.push_back(exe + "/../bin");
  }
  std::vector<std::string> out;
  for (const std::string& d : dirs) {
    const std::string p = std::filesystem::path(d + "/" + kBinary).lexically_normal().string();
    if (std::find(out.begin(), out.end(), p) == out.end()) out.push_back(p);
  }
  return out;
}

std::string find_device_binary(const connection_options& o) {
  for (const std::string& p : device_binary_candidates(o))
    if (executable(p)) return p;
  return {};
}

result<std::unique_ptr<connection>> connection::open(const connection_options& o) {
  std::unique_ptr<connection> c(new connection());
  c->timeout_ms_ = o.timeout_ms == 0 ? 5000 : o.timeout_ms;
  INSTINFER_TRY(o.attach.empty() ? c->start(o) : c->attach(o));
  // Identify: what the drive is, and a first round trip.
  c->counted_ = false;
  sq_entry e{};
  e.opcode = static_cast<uint8_t>(opcode::kIdentify);
  e.result_bytes = sizeof(identify_data);
  INSTINFER_TRY(c->execute(e));
  std::memcpy(&c->identity_, c->area(), sizeof(identify_data));
  if (c->identity_.version != kProtocolVersion)
    return status{errc::kUnsupported, "drive speaks protocol version " + std::to_string(c->identity_.version) +
                                          ", this library " + std::to_string(kProtocolVersion)};
  return c;
}

status connection::start(const connection_options& o) {
  const std::string bin = find_device_binary(o);
  if (bin.empty()) {
    std::string tried;
    for (const std::string& p : device_binary_candidates(o)) tried += (tried.empty() ? "" : ", ") + p;
    return {errc::kUnsupported, "the drive binary instinfer-csd was not found (tried: " + tried +
                                    "); set INSTINFER_CSD_DEVICE or the csd: option device=PATH"};
  }
  if (!o.layout.valid()) return {errc::kInvalidArgument, "bad queue layout"};
  fd_ = ::memfd_create("instinfer-csd", MFD_CLOEXEC);
  if (fd_ < 0) return {errc::kIoError, std::string("memfd_create: ") + std::strerror(errno)};
  map_bytes_ = o.layout.total_bytes();
  if (::ftruncate(fd_, static_cast<off_t>(map_bytes_)) != 0)
    return {errc::kOutOfMemory, std::string("sizing shared memory: ") + std::strerror(errno)};
  map_ = ::mmap(nullptr, map_bytes_, PROT_READ | PROT_WRITE, MAP_SHARED, fd_, 0);
  if (map_ == MAP_FAILED) {
    map_ = nullptr;
    return {errc::kOutOfMemory, std::string("mmap: ") + std::strerror(errno)};
  }
  auto* base = static_cast<std::byte*>(map_);
  header_ = reinterpret_cast<region_header*>(base);
  view_ = qp_view::at(base, o.layout, 0);
  view_.control->owner_pid.store(static_cast<int32_t>(::getpid()));
  view_.control->generation.store(1);

  // Hand the region to the child as fd 3, its flash as fd 4 and the flash's lock as fd 5 (dup2
  // clears close-on-exec on the copies; the high copies keep the originals out of the way of 3-5).
  const int high = ::fcntl(fd_, F_DUPFD_CLOEXEC, 10);
  if (high < 0) return {errc::kIoError, std::string("dup: ") + std::strerror(errno)};
  int handed[2] = {-1, -1};  // flash, lock
  const int wanted[2] = {o.flash_fd, o.flash_lock_fd};
  for (int i = 0; i < 2; ++i) {
    if (wanted[i] < 0) continue;
    handed[i] = ::fcntl(wanted[i], F_DUPFD_CLOEXEC, 10);
    if (handed[i] < 0) {
      const int err = errno;
      for (int fd : {high, handed[0]})
        if (fd >= 0) ::close(fd);
      return {errc::kIoError, std::string("dup: ") + std::strerror(err)};
    }
  }
  std::vector<std::string> args;
  std::string emulator = o.emulator;
  if (emulator.empty())
    if (const char* env = std::getenv("INSTINFER_CSD_EMULATOR"); env && *env) emulator = env;
  if (!emulator.empty()) args.push_back(emulator);
  args.push_back(bin);
  for (const std::string& s :
       {std::string("--shm-fd"), std::string("3"), std::string("--parent-pid"), std::to_string(::getpid()),
        std::string("--queue-pairs"), std::to_string(o.layout.n_queue_pairs), std::string("--depth"),
        std::to_string(o.layout.depth), std::string("--data-bytes"), std::to_string(o.layout.data_bytes)})
    args.push_back(s);
  if (handed[0] >= 0) {
    args.push_back("--flash-fd");
    args.push_back("4");
  }
  if (handed[1] >= 0) {
    args.push_back("--flash-lock-fd");
    args.push_back("5");
  }
  for (const std::string& s : o.device_args) args.push_back(s);
  std::vector<char*> argv;
  for (std::string& s : args) argv.push_back(s.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, high, 3);
  if (handed[0] >= 0) posix_spawn_file_actions_adddup2(&fa, handed[0], 4);
  if (handed[1] >= 0) posix_spawn_file_actions_adddup2(&fa, handed[1], 5);
  pid_t pid = -1;
  const int rc = emulator.empty() ? ::posix_spawn(&pid, argv[0], &fa, nullptr, argv.data(), environ)
                                  : ::posix_spawnp(&pid, argv[0], &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  ::close(high);
  for (int fd : handed)
    if (fd >= 0) ::close(fd);
  if (rc != 0) return {errc::kUnsupported, "cannot start " + std::string(argv[0]) + ": " + std::strerror(rc)};
  child_ = pid;
  const uint32_t start_ms = o.start_timeout_ms ? o.start_timeout_ms : 60000;
  const int64_t deadline = now_ms() + start_ms;
  while (header_->device_ready.load(std::memory_order_acquire) != 1 || header_->magic != kRegionMagic) {
    int st = 0;
    if (::waitpid(child_, &st, WNOHANG) == child_) {
      child_ = -1;
      lost_ = true;
      return {errc::kDeviceLost, "the drive " + bin + " exited during start-up (" +
                                     (WIFEXITED(st) ? "status " + std::to_string(WEXITSTATUS(st))
                                                    : "signal " + std::to_string(WTERMSIG(st))) +
                                     "); its stderr says why"};
    }
    if (now_ms() > deadline) {
      fail_closed();  // killed: a drive that missed its start-up is not trusted later
      return {errc::kTimeout, "the drive " + bin + " did not become ready within " + std::to_string(start_ms) +
                                  " ms (csd: option timeout_ms; a drive under qemu may need more)"};
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return {};
}

status connection::attach(const connection_options& o) {
  const std::string name = "/instinfer-csd-" + o.attach;
  fd_ = ::shm_open(name.c_str(), O_RDWR | O_CLOEXEC, 0);
  if (fd_ < 0) return {errc::kDeviceLost, "no drive named '" + o.attach + "' (" + std::strerror(errno) + ")"};
  struct stat st {};
  if (::fstat(fd_, &st) != 0 || static_cast<uint64_t>(st.st_size) < kHeaderBytes)
    return {errc::kCorruptData, "drive '" + o.attach + "' has no valid shared memory"};
  map_bytes_ = static_cast<uint64_t>(st.st_size);
  map_ = ::mmap(nullptr, map_bytes_, PROT_READ | PROT_WRITE, MAP_SHARED, fd_, 0);
  if (map_ == MAP_FAILED) {
    map_ = nullptr;
    return {errc::kOutOfMemory, std::string("mmap: ") + std::strerror(errno)};
  }
  header_ = static_cast<region_header*>(map_);
  const uint32_t wait_ms = o.timeout_ms ? o.timeout_ms : 5000;
  const int64_t deadline = now_ms() + wait_ms;
  while (header_->device_ready.load(std::memory_order_acquire) != 1 || header_->magic != kRegionMagic) {
    if (now_ms() > deadline)
      return {errc::kDeviceLost,
              "drive '" + o.attach + "' is not serving (not ready within " + std::to_string(wait_ms) + " ms)"};
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  const region_layout l{header_->n_queue_pairs, header_->depth, header_->data_bytes};
  if (!l.valid() || l.total_bytes() > map_bytes_ || header_->version != kProtocolVersion)
    return {errc::kCorruptData, "drive '" + o.attach + "' has an unexpected shared-memory layout"};
  for (uint32_t q = 0; q < l.n_queue_pairs; ++q) {
    qp_view v = qp_view::at(static_cast<std::byte*>(map_), l, q);
    int32_t expected = 0;
    if (!v.control->owner_pid.compare_exchange_strong(expected, static_cast<int32_t>(::getpid()))) continue;
    v.control->sq_tail.store(0);
    v.control->sq_head.store(0);
    v.control->cq_tail.store(0);
    v.control->cq_head.store(0);
    v.control->generation.fetch_add(1, std::memory_order_release);
    view_ = v;
    qp_ = q;
    return {};
  }
  return {errc::kBusy, "every queue pair of drive '" + o.attach + "' is in use"};
}

int32_t connection::device_pid() const noexcept {
  if (child_ > 0) return child_;
  return header_ ? header_->device_pid.load() : -1;
}

status connection::check_alive() noexcept {
  if (child_ > 0) {
    int st = 0;
    const pid_t r = ::waitpid(child_, &st, WNOHANG);
    if (r == child_ || (r < 0 && errno == ECHILD)) {
      child_ = -1;
      return {errc::kDeviceLost, "the drive process exited (" +
                                     std::string(r == -1           ? "reaped elsewhere"
                                                 : WIFSIGNALED(st) ? "killed by signal " + std::to_string(WTERMSIG(st))
                                                                   : "status " + std::to_string(WEXITSTATUS(st))) +
                                     ")"};
    }
    return {};
  }
  const int32_t pid = header_->device_pid.load();
  if (header_->device_ready.load() == 2 || (pid > 0 && ::kill(pid, 0) != 0 && errno == ESRCH))
    return {errc::kDeviceLost, "the drive process is gone"};
  return {};
}

void connection::fail_closed() noexcept {
  lost_ = true;
  outstanding_ = false;
  if (child_ > 0) {  // a drive that stopped answering is not trusted again
    ::kill(child_, SIGKILL);
    ::waitpid(child_, nullptr, 0);
    child_ = -1;
  }
}

status connection::post(sq_entry e) noexcept {
  if (lost_) return {errc::kDeviceLost, "the drive connection is closed (the drive died or timed out earlier)"};
  if (outstanding_) return {errc::kInternal, "a command is already outstanding on this queue pair"};
  e.cid = next_cid_++;
  if (next_cid_ == 0) next_cid_ = 1;
  const uint32_t tail = view_.control->sq_tail.load(std::memory_order_relaxed);
  view_.sq[tail % view_.depth] = e;
  view_.control->sq_tail.store(tail + 1, std::memory_order_seq_cst);
  header_->doorbell.fetch_add(1, std::memory_order_seq_cst);
  if (header_->device_sleeping.load(std::memory_order_seq_cst)) futex_wake_all(&header_->doorbell);
  outstanding_ = true;
  counted_ = e.opcode != static_cast<uint8_t>(opcode::kStats) && e.opcode != static_cast<uint8_t>(opcode::kIdentify);
  if (counted_) link_in_ += csd::link_bytes_in(e.data_bytes);
  last_ = cq_entry{};
  last_.cid = e.cid;
  return {};
}

status connection::wait() noexcept {
  if (lost_) return {errc::kDeviceLost, "the drive connection is closed (the drive died or timed out earlier)"};
  if (!outstanding_) return {errc::kInternal, "no command outstanding"};
  const int64_t deadline = now_ms() + timeout_ms_;
  const uint32_t head = view_.control->cq_head.load(std::memory_order_relaxed);
  uint32_t spins = 0;
  for (;;) {
    const uint32_t tail = view_.control->cq_tail.load(std::memory_order_acquire);
    if (tail != head) break;
    if (++spins < 256) continue;
    view_.control->host_waiting.store(1, std::memory_order_seq_cst);
    if (view_.control->cq_tail.load(std::memory_order_seq_cst) == head)
      futex_wait(&view_.control->cq_tail, head, 5'000'000);  // 5 ms slices: liveness checks
    view_.control->host_waiting.store(0, std::memory_order_relaxed);
    if (view_.control->cq_tail.load(std::memory_order_acquire) != head) break;
    status alive = check_alive();
    if (!alive.ok()) {
      fail_closed();
      return alive;
    }
    if (now_ms() > deadline) {
      fail_closed();
      return {errc::kTimeout, "the drive did not complete a command within " + std::to_string(timeout_ms_) + " ms"};
    }
  }
  last_ = view_.cq[head % view_.depth];
  view_.control->cq_head.store(head + 1, std::memory_order_release);
  outstanding_ = false;
  if (counted_) link_out_ += csd::link_bytes_out(last_.result);
  if (last_.status != 0) {
    const error_record& er = view_.errors[last_.cid % view_.depth];
    std::string text(er.text, strnlen(er.text, sizeof er.text));
    return {static_cast<errc>(last_.status), "drive: " + text};
  }
  return {};
}

connection::~connection() {
  if (child_ > 0) {
    if (!lost_ && !outstanding_) {
      sq_entry e{};
      e.opcode = static_cast<uint8_t>(opcode::kShutdown);
      const uint32_t saved = timeout_ms_;
      timeout_ms_ = 1000;
      (void)execute(e);
      timeout_ms_ = saved;
    }
    if (child_ > 0) {
      int st = 0;
      const int64_t deadline = now_ms() + 2000;
      while (::waitpid(child_, &st, WNOHANG) == 0) {
        if (now_ms() > deadline) {
          ::kill(child_, SIGKILL);
          ::waitpid(child_, &st, 0);
          break;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
    }
  } else if (map_ && view_.control && !lost_) {
    view_.control->owner_pid.store(0, std::memory_order_release);
  }
  if (map_) ::munmap(map_, map_bytes_);
  if (fd_ >= 0) ::close(fd_);
}

}  // namespace instinfer::csd
