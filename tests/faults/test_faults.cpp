// Fault tests: the machine fails under the library, through the C API. One ctest per scenario
// (instinfer-test-faults-<scenario>), each skipped (exit 77) where this machine cannot stage it:
//
//   enospc    ssd: on a 10 MiB tmpfs (mounted in a private mount namespace: root only): the
//             append that runs out of space fails with INSTINFER_E_NO_SPACE and changes nothing
//   eio       csd: with INSTINFER_CSD_FAULT (docs/csd.md): a flash read failing inside attend and a
//             flash program failing inside append are INSTINFER_E_IO; the same calls then work
//   memory    host: a capacity over RAM + swap is INSTINFER_E_OUT_OF_MEMORY at create; a large one
//             below it is reserved lazily (no memory until used)
//   kill-ssd, kill-csd   a process SIGKILLed in the middle of attend (a child of this test); a new
//             cache on the same path then works, and no drive process is left behind
//
// In each, another sequence is attended before and after the fault: bit-identical results, and
// every result matches the float64 reference over the rows appended.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <dirent.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/mount.h>
#include <sys/sysinfo.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "instinfer/core/dtype.hpp"
#include "instinfer/instinfer.h"
#include "instinfer/testing/reference.hpp"
#include "support/scratch.hpp"

namespace {

using instinfer::dtype;

constexpr uint32_t kDim = 64, kQHeads = 2;  // one layer, one kv head (GQA group 2), f16, 4 KiB pages
constexpr uint32_t kTokensPerPage = 4096 / (kDim * 2);

[[noreturn]] void skip(const std::string& why) {
  std::fprintf(stderr, "skipped: %s\n", why.c_str());
  std::fflush(stderr);
  std::_Exit(77);
}

// ---- caches and a model of what their sequences hold --------------------------------------------

struct cache_handle {
  instinfer_cache* c = nullptr;
  cache_handle() = default;
  cache_handle(const cache_handle&) = delete;
  cache_handle& operator=(const cache_handle&) = delete;
  ~cache_handle() { instinfer_cache_destroy(c); }
};

instinfer_status create(const std::string& uri, uint64_t capacity_bytes, cache_handle& h) {
  instinfer_config cfg;
  instinfer_config_init(&cfg);
  cfg.n_layers = 1;
  cfg.n_q_heads = kQHeads;
  cfg.n_kv_heads = 1;
  cfg.head_dim = kDim;
  cfg.kv_dtype = INSTINFER_DTYPE_F16;
  cfg.page_bytes = 4096;
  cfg.capacity_bytes = capacity_bytes;
  cfg.n_threads = 2;
  cfg.backend = uri.c_str();
  return instinfer_cache_create(&cfg, &h.c);
}

// The f16 rows of one sequence, as appended (exactly what the cache stores).
struct seq_model {
  instinfer_seq id = 0;
  std::vector<uint16_t> k, v;  // [n][head_dim]
  uint64_t n() const { return k.size() / kDim; }
};

std::vector<uint16_t> random_f16(std::mt19937& rng, size_t count) {
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> f(count);
  for (float& x : f) x = dist(rng);
  std::vector<uint16_t> h(count);
  instinfer::convert_elements(f.data(), dtype::kF32, h.data(), dtype::kF16, count);
  return h;
}

instinfer_status append(instinfer_cache* c, seq_model& s, uint32_t n, std::mt19937& rng) {
  const std::vector<uint16_t> k = random_f16(rng, size_t{n} * kDim), v = random_f16(rng, size_t{n} * kDim);
  const instinfer_status st = instinfer_append(c, s.id, 0, n, k.data(), v.data(), INSTINFER_DTYPE_F16);
  if (st == INSTINFER_OK) {
    s.k.insert(s.k.end(), k.begin(), k.end());
    s.v.insert(s.v.end(), v.begin(), v.end());
  }
  return st;
}

seq_model new_seq(instinfer_cache* c) {
  seq_model s;
  REQUIRE(instinfer_seq_create(c, &s.id) == INSTINFER_OK);
  return s;
}

std::vector<float> fixed_q() {
  std::mt19937 rng(99);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> q(kQHeads * kDim);
  for (float& x : q) x = dist(rng);
  return q;
}

// Attention of one sequence: out [q_heads][d] then lse [q_heads]; the status through `st`.
std::vector<float> attend(instinfer_cache* c, const seq_model& s, instinfer_status* st = nullptr) {
  const std::vector<float> q = fixed_q();
  std::vector<float> out(kQHeads * kDim + kQHeads, std::nanf(""));
  const instinfer_status got = instinfer_attend(c, 0, 1, &s.id, q.data(), out.data(), out.data() + kQHeads * kDim);
  if (st)
    *st = got;
  else
    REQUIRE_MESSAGE(got == INSTINFER_OK, instinfer_last_error());
  return out;
}

// The cache's attention over s matches the float64 reference over s's rows.
void check_reference(instinfer_cache* c, const seq_model& s) {
  const std::vector<float> got = attend(c, s), q = fixed_q();
  std::vector<double> want(kQHeads * kDim), lse(kQHeads);
  instinfer::reference::attend_rows(s.k.data(), s.v.data(), dtype::kF16, s.n(), kDim, q.data(), kQHeads,
                                    1.0 / std::sqrt(double{kDim}), 0.0, want.data(), lse.data());
  double err = 0.0, mag = 0.0;
  for (size_t i = 0; i < want.size(); ++i) {
    err = std::max(err, std::fabs(got[i] - want[i]));
    mag = std::max(mag, std::fabs(want[i]));
  }
  CAPTURE(s.n());
  CHECK(err <= 1e-5 * std::max(mag, 1e-6));
  for (uint32_t h = 0; h < kQHeads; ++h)
    CHECK(std::fabs(got[kQHeads * kDim + h] - lse[h]) <= 1e-5 * std::max(1.0, std::fabs(lse[h])));
}

uint64_t length(instinfer_cache* c, const seq_model& s) {
  uint64_t n = 0;
  REQUIRE(instinfer_seq_length(c, s.id, 0, &n) == INSTINFER_OK);
  return n;
}

instinfer_stats stats(instinfer_cache* c) {
  instinfer_stats st{};
  st.struct_size = sizeof st;
  REQUIRE(instinfer_cache_stats(c, &st) == INSTINFER_OK);
  return st;
}

bool contains(const char* text, const char* part) {
  return std::strstr(text, part) != nullptr;
}

// ---- scratch files ----------------------------------------------------------------------------

using test_support::direct_io_works;

std::string scratch_dir(const std::string& parent) {
  std::string tmpl = parent + "/instinfer-faults-XXXXXX";
  if (!::mkdtemp(tmpl.data())) return {};
  return tmpl;
}

struct removed_on_exit {
  std::string dir;
  bool mounted = false;
  ~removed_on_exit() {
    if (dir.empty()) return;
    if (mounted) ::umount2(dir.c_str(), MNT_DETACH);
    const std::string cmd = "rm -rf '" + dir + "'";
    if (std::system(cmd.c_str()) != 0) std::fprintf(stderr, "could not remove %s\n", dir.c_str());
  }
};

// The csd: URI of a small drive with its flash in `file` (buffered where O_DIRECT is refused).
std::string csd_uri(const std::string& dir, const std::string& file, const std::string& extra = "") {
  return "csd:" + dir + "/" + file + "?channels=2&dies=2&blocks_per_die=16&pages_per_block=16&cores=2&buffer_mb=1" +
         (direct_io_works(dir) ? "" : "&buffered=1") + extra;
}

// Processes whose command line mentions `needle` (a drive left behind names its flash file).
int processes_naming(const std::string& needle) {
  int found = 0;
  DIR* d = ::opendir("/proc");
  if (!d) return 0;
  while (const dirent* e = ::readdir(d)) {
    if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
    std::ifstream f(std::string("/proc/") + e->d_name + "/cmdline", std::ios::binary);
    const std::string cmdline((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    if (cmdline.find(needle) != std::string::npos && std::atoi(e->d_name) != ::getpid()) ++found;
  }
  ::closedir(d);
  return found;
}

// Whether no open file description holds the storage lock (flock) on `path`.
bool lock_is_free(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return true;
  const bool got = ::flock(fd, LOCK_EX | LOCK_NB) == 0;
  ::close(fd);  // releases it again
  return got;
}

// ---- kill: the child side -----------------------------------------------------------------------

// The child of a kill scenario: fills a cache on `uri`, says "ready" on stdout, then attends in a
// loop until it is killed.
// A drive sizes its namespace from its flash; the host pool gets 64 MiB.
uint64_t capacity_for(const std::string& uri) {
  return uri.rfind("csd:", 0) == 0 ? 0 : 64ull << 20;
}

int run_child(const std::string& uri) {
  cache_handle h;
  if (create(uri, capacity_for(uri), h) != INSTINFER_OK) {
    std::fprintf(stderr, "child: %s\n", instinfer_last_error());
    return 1;
  }
  std::mt19937 rng(5);
  seq_model a, b;
  if (instinfer_seq_create(h.c, &a.id) != INSTINFER_OK || instinfer_seq_create(h.c, &b.id) != INSTINFER_OK) return 1;
  for (int i = 0; i < 8; ++i)
    if (append(h.c, a, 250, rng) != INSTINFER_OK || append(h.c, b, 250, rng) != INSTINFER_OK) return 1;
  if (std::fputs("ready\n", stdout) < 0 || std::fflush(stdout) != 0) return 1;
  for (;;) {
    instinfer_status st;
    (void)attend(h.c, a, &st);
    (void)attend(h.c, b, &st);
  }
}

// Starts this executable as a kill-scenario child; returns its pid once it is attending.
pid_t start_child(const std::string& uri) {
  int fds[2];
  REQUIRE(::pipe(fds) == 0);
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::dup2(fds[1], 1);
    ::close(fds[0]);
    ::close(fds[1]);
    const char* argv[] = {"instinfer-test-faults", "--child", uri.c_str(), nullptr};
    ::execv("/proc/self/exe", const_cast<char* const*>(argv));
    std::_Exit(127);
  }
  ::close(fds[1]);
  std::string said;
  char ch;
  while (said.find("ready") == std::string::npos && ::read(fds[0], &ch, 1) == 1) said += ch;
  ::close(fds[0]);
  if (said.find("ready") == std::string::npos) {
    int status = 0;
    ::waitpid(pid, &status, 0);
    FAIL("the child could not fill its cache (exit status " << status << ")");
  }
  return pid;
}

// SIGKILL in the middle of attend, then a new cache on the same path.
void kill_mid_attend(const std::string& uri, const std::string& flash_file, uint32_t attend_ms) {
  const pid_t child = start_child(uri);
  // The child attends in a loop (on csd each attend sleeps attend_ms on the drive): a kill some
  // milliseconds in lands inside one.
  std::this_thread::sleep_for(std::chrono::milliseconds(attend_ms / 2 + 20));
  REQUIRE(::kill(child, SIGKILL) == 0);
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  CHECK(WIFSIGNALED(status));
  CHECK(WTERMSIG(status) == SIGKILL);
  // A drive started by the killed process dies with it (PR_SET_PDEATHSIG).
  int left = 0;
  for (int i = 0; i < 100 && (left = processes_naming(flash_file)) > 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  CHECK_MESSAGE(left == 0, "a process still names " << flash_file << " after its owner was killed");
  // A dying process gives up its address space (and so its /proc command line) before its files:
  // the drive's lock on the flash can outlive the check above for a moment. Wait for the lock too.
  bool free = false;
  for (int i = 0; i < 100 && !(free = lock_is_free(flash_file)); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  CHECK_MESSAGE(free, flash_file << " is still locked after its owner was killed");

  // A new cache on the same file: it works and holds only what it is given.
  cache_handle h;
  REQUIRE_MESSAGE(create(uri, capacity_for(uri), h) == INSTINFER_OK, instinfer_last_error());
  std::mt19937 rng(6);
  seq_model a = new_seq(h.c), b = new_seq(h.c);
  REQUIRE(append(h.c, a, 300, rng) == INSTINFER_OK);
  REQUIRE(append(h.c, b, 77, rng) == INSTINFER_OK);
  check_reference(h.c, a);
  check_reference(h.c, b);
  CHECK(instinfer_cache_flush(h.c) == INSTINFER_OK);
  check_reference(h.c, a);
}

}  // namespace

// ---- scenarios ------------------------------------------------------------------------------------

TEST_CASE("enospc") {
  if (::geteuid() != 0) skip("mounting a small tmpfs needs root");
  // A private mount namespace: the tmpfs disappears with this process, whatever happens.
  if (::unshare(CLONE_NEWNS) != 0) skip(std::string("unshare(CLONE_NEWNS): ") + std::strerror(errno));
  if (::mount("none", "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0)
    skip(std::string("making / private: ") + std::strerror(errno));
  const std::string dir = scratch_dir("/tmp");
  REQUIRE(!dir.empty());
  removed_on_exit cleanup{dir};
  // Room for two of the backend's 4 MiB extents (fallocated as a stream first needs them): a's
  // and b's first; b's second does not fit.
  if (::mount("tmpfs", dir.c_str(), "tmpfs", 0, "size=10m") != 0)
    skip(std::string("mount -t tmpfs: ") + std::strerror(errno));
  cleanup.mounted = true;

  // The backend thinks it has 64 MiB (a sparse file); the filesystem runs out far sooner.
  std::string uri = "ssd:" + dir + "/kv.bin?capacity=64M";
  if (!direct_io_works(dir)) uri += "&buffered=1";
  cache_handle h;
  REQUIRE_MESSAGE(create(uri, 0, h) == INSTINFER_OK, instinfer_last_error());
  std::mt19937 rng(1);
  seq_model a = new_seq(h.c), b = new_seq(h.c);
  REQUIRE(append(h.c, a, 40, rng) == INSTINFER_OK);
  const std::vector<float> a_before = attend(h.c, a);
  check_reference(h.c, a);

  // b grows by several chunks per append until the filesystem is full.
  instinfer_status st = INSTINFER_OK;
  for (int i = 0; i < 400 && st == INSTINFER_OK; ++i) {
    const uint64_t used = stats(h.c).used_chunks, n = b.n();
    st = append(h.c, b, 5 * kTokensPerPage + 5, rng);
    if (st != INSTINFER_OK) {
      CHECK_MESSAGE(st == INSTINFER_E_NO_SPACE, instinfer_status_name(st), ": ", instinfer_last_error());
      CHECK(contains(instinfer_last_error(), "space"));  // strerror(ENOSPC), or the backend's words
      CHECK(length(h.c, b) == n);                        // nothing appended...
      CHECK(stats(h.c).used_chunks == used);             // ...and no chunk kept
    }
  }
  REQUIRE_MESSAGE(st == INSTINFER_E_NO_SPACE, "never ran out of space");
  MESSAGE("out of space after ", b.n(), " tokens of b");
  CHECK(attend(h.c, a) == a_before);  // the other sequence, bit for bit
  check_reference(h.c, b);
  CHECK(instinfer_cache_flush(h.c) == INSTINFER_OK);

  // Space freed is used again.
  REQUIRE(instinfer_seq_free(h.c, b.id) == INSTINFER_OK);
  REQUIRE(append(h.c, a, 3 * kTokensPerPage, rng) == INSTINFER_OK);
  check_reference(h.c, a);
  CHECK(instinfer_cache_flush(h.c) == INSTINFER_OK);
}

TEST_CASE("eio") {
  const std::string dir = scratch_dir("/dev/shm");
  REQUIRE(!dir.empty());
  removed_on_exit cleanup{dir};
  std::mt19937 rng(2);

  SUBCASE("a flash read fails inside attend") {
    // a's attend reads its two sealed chunks (K and V: 4 pages) first; b's first read is the 5th.
    ::setenv("INSTINFER_CSD_FAULT", "read:5", 1);
    cache_handle h;
    const instinfer_status created = create(csd_uri(dir, "read.flash"), 0, h);
    ::unsetenv("INSTINFER_CSD_FAULT");
    if (created == INSTINFER_E_UNSUPPORTED) skip("the csd backend is not built in");
    if (created != INSTINFER_OK) skip(std::string("no drive: ") + instinfer_last_error());
    seq_model a = new_seq(h.c), b = new_seq(h.c);
    REQUIRE(append(h.c, a, 2 * kTokensPerPage, rng) == INSTINFER_OK);
    REQUIRE(append(h.c, b, 2 * kTokensPerPage, rng) == INSTINFER_OK);
    const std::vector<float> a_before = attend(h.c, a);
    instinfer_status st;
    (void)attend(h.c, b, &st);
    CHECK(st == INSTINFER_E_IO);
    CHECK(contains(instinfer_last_error(), "injected"));
    check_reference(h.c, b);  // one read failed, the next attend reads again
    CHECK(attend(h.c, a) == a_before);
    CHECK(length(h.c, b) == 2 * kTokensPerPage);
  }
  SUBCASE("a flash program fails inside append") {
    // a's first chunk is the 1st program; the 2nd is b's, sealed by its append.
    ::setenv("INSTINFER_CSD_FAULT", "program:2", 1);
    cache_handle h;
    const instinfer_status created = create(csd_uri(dir, "program.flash"), 0, h);
    ::unsetenv("INSTINFER_CSD_FAULT");
    if (created == INSTINFER_E_UNSUPPORTED) skip("the csd backend is not built in");
    if (created != INSTINFER_OK) skip(std::string("no drive: ") + instinfer_last_error());
    seq_model a = new_seq(h.c), b = new_seq(h.c);
    REQUIRE(append(h.c, a, kTokensPerPage, rng) == INSTINFER_OK);
    const std::vector<float> a_before = attend(h.c, a);
    const uint64_t used = stats(h.c).used_chunks;
    CHECK(append(h.c, b, kTokensPerPage + 8, rng) == INSTINFER_E_IO);
    CHECK(contains(instinfer_last_error(), "injected"));
    CHECK(length(h.c, b) == 0);
    CHECK(stats(h.c).used_chunks == used);
    CHECK(attend(h.c, a) == a_before);
    REQUIRE(append(h.c, b, kTokensPerPage + 8, rng) == INSTINFER_OK);  // the drive goes on
    check_reference(h.c, b);
    REQUIRE(append(h.c, a, 2 * kTokensPerPage, rng) == INSTINFER_OK);
    check_reference(h.c, a);
  }
}

TEST_CASE("memory") {
  struct sysinfo si {};
  REQUIRE(::sysinfo(&si) == 0);
  const uint64_t machine = (uint64_t{si.totalram} + si.totalswap) * si.mem_unit;
  cache_handle small;
  REQUIRE(create("host", 16ull << 20, small) == INSTINFER_OK);
  std::mt19937 rng(3);
  seq_model a = new_seq(small.c);
  REQUIRE(append(small.c, a, 100, rng) == INSTINFER_OK);
  const std::vector<float> a_before = attend(small.c, a);

  // More than the machine could ever back: refused at create, not left to the OOM killer.
  const uint64_t tib = 1ull << 40;
  if (machine < tib) {
    cache_handle huge;
    CHECK(create("host", tib, huge) == INSTINFER_E_OUT_OF_MEMORY);
    CHECK(huge.c == nullptr);
    CHECK(contains(instinfer_last_error(), "exceeds this machine's memory"));
  } else {
    MESSAGE("this machine has over 1 TiB of RAM and swap: the refusal is not checked");
  }
  cache_handle over;
  CHECK(create("host", machine + (1ull << 30), over) == INSTINFER_E_OUT_OF_MEMORY);

  // Below it, a large pool costs nothing until written: the reservation is lazy.
  const auto rss = [] {
    std::ifstream f("/proc/self/statm");
    uint64_t size = 0, resident = 0;
    f >> size >> resident;
    return resident * static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  };
  const uint64_t rss0 = rss();
  {
    cache_handle big;
    REQUIRE_MESSAGE(create("host", std::min<uint64_t>(machine / 2, 8ull << 30), big) == INSTINFER_OK,
                    instinfer_last_error());
    seq_model s = new_seq(big.c);
    REQUIRE(append(big.c, s, 100, rng) == INSTINFER_OK);
    check_reference(big.c, s);
    CHECK(rss() < rss0 + (64ull << 20));
  }
  CHECK(attend(small.c, a) == a_before);
}

TEST_CASE("kill-ssd") {
  const std::string dir = scratch_dir("/dev/shm");
  REQUIRE(!dir.empty());
  removed_on_exit cleanup{dir};
  if (!direct_io_works(dir)) skip(dir + " does not support O_DIRECT");
  cache_handle probe;
  if (create("ssd:" + dir + "/probe.bin", 1 << 20, probe) == INSTINFER_E_UNSUPPORTED)
    skip("the ssd backend is not built in");
  // keep=1: the file outlives the killed process as it would anyway (no destructor runs).
  kill_mid_attend("ssd:" + dir + "/kv.bin?keep=1", dir + "/kv.bin", 5);
}

TEST_CASE("kill-csd") {
  const std::string dir = scratch_dir("/dev/shm");
  REQUIRE(!dir.empty());
  removed_on_exit cleanup{dir};
  cache_handle probe;
  const instinfer_status st = create(csd_uri(dir, "probe.flash"), 0, probe);
  if (st == INSTINFER_E_UNSUPPORTED) skip("the csd backend is not built in");
  if (st != INSTINFER_OK) skip(std::string("no drive: ") + instinfer_last_error());
  instinfer_cache_destroy(probe.c);
  probe.c = nullptr;
  // Every attend sleeps 200 ms on the drive: the kill lands inside one.
  kill_mid_attend(csd_uri(dir, "kv.flash", "&debug_attend_delay_ms=200"), dir + "/kv.flash", 200);
}

int main(int argc, char** argv) {
  if (argc == 3 && std::strcmp(argv[1], "--child") == 0) return run_child(argv[2]);
  std::vector<char*> args{argv[0]};
  std::string scenario;
  for (int i = 1; i < argc; ++i) {
    if (argv[i][0] != '-' && scenario.empty())
      scenario = argv[i];
    else
      args.push_back(argv[i]);
  }
  std::string filter = "--test-case=" + (scenario.empty() ? std::string("*") : scenario);
  args.push_back(filter.data());
  doctest::Context ctx(static_cast<int>(args.size()), args.data());
  return ctx.run();
}
