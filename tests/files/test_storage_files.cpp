// The storage files of ssd: and csd: caches are exclusive and private, and go with their cache.
// One ctest per backend (instinfer-test-storage-files-ssd, -csd), skipped (77) where the backend is
// not built or cannot run here:
//
//   * a second cache on a file in use, in this process or another, is kBusy, and the first cache's
//     results are unchanged (checked against the float64 reference over the rows appended);
//   * a process holding the file that is killed releases it (a new cache then works);
//   * files are created 0600 (under umask 0), a symbolic link at the path is refused;
//   * destroy removes what the cache created (every drive's flash), a failed create too (a
//     rejected drives=3, a drive that fails start-up); a file that was there before, or keep=1,
//     stays; a new cache on the same path after destroy works.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "instinfer/backend/registry.hpp"
#include "instinfer/core/dtype.hpp"
#include "instinfer/kv/kv_cache.hpp"
#include "instinfer/testing/reference.hpp"
#include "support/scratch.hpp"

using namespace instinfer;

namespace {

constexpr uint32_t kDim = 64, kQHeads = 2;  // one layer, one kv head (GQA group 2), f16, 4 KiB pages

std::string g_backend;  // "ssd" or "csd"
std::string g_dir;      // scratch directory of this run
bool g_buffered = false;

[[noreturn]] void skip(const std::string& why) {
  std::fprintf(stderr, "skipped: %s\n", why.c_str());
  std::fflush(stderr);
  std::_Exit(77);
}

std::string path_of(const std::string& name) {
  return g_dir + "/" + name;
}

// The URI of this run's backend on `file` (a small drive for csd), `extra` appended as options.
std::string uri_for(const std::string& file, const std::string& extra = "") {
  std::string uri = g_backend + ":" + file + "?";
  if (g_backend == "csd") uri += "channels=2&dies=2&blocks_per_die=16&pages_per_block=16&cores=2&buffer_mb=1&";
  if (g_buffered) uri += "buffered=1&";
  uri += extra;
  if (uri.back() == '&' || uri.back() == '?') uri.pop_back();
  return uri;
}

result<std::unique_ptr<kv_cache>> make(const std::string& uri, uint32_t n_kv_heads = 1) {
  cache_options o;
  o.shape = kv_shape{1, kQHeads * n_kv_heads, n_kv_heads, kDim, dtype::kF16};
  o.page_bytes = 4096;
  o.capacity_bytes = g_backend == "csd" ? 0 : 8ull << 20;
  o.n_threads = 2;
  o.backend_uri = uri;
  return kv_cache::create(o);
}

std::unique_ptr<kv_cache> must_make(const std::string& uri) {
  auto c = make(uri);
  REQUIRE_MESSAGE(c.ok(), uri << ": " << c.error().to_string());
  return std::move(c).value();
}

bool exists(const std::string& p) {
  struct stat st {};
  return ::lstat(p.c_str(), &st) == 0;
}

// ---- a sequence and the float64 reference over the rows appended ----------------------------

struct seq_model {
  seq_id id = 0;
  std::vector<uint16_t> k, v;  // f16 [n][head_dim], exactly what the cache stores
};

void append(kv_cache& c, seq_model& s, uint32_t n, std::mt19937& rng) {
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> f(size_t{n} * kDim * 2);
  for (float& x : f) x = dist(rng);
  std::vector<uint16_t> h(f.size());
  convert_elements(f.data(), dtype::kF32, h.data(), dtype::kF16, f.size());
  const uint16_t* k = h.data();
  const uint16_t* v = h.data() + size_t{n} * kDim;
  const status st = c.append(s.id, 0, n, k, v, dtype::kF16);
  REQUIRE_MESSAGE(st.ok(), st.to_string());
  s.k.insert(s.k.end(), k, k + size_t{n} * kDim);
  s.v.insert(s.v.end(), v, v + size_t{n} * kDim);
}

seq_model filled_seq(kv_cache& c, uint32_t n, uint32_t seed) {
  seq_model s;
  auto id = c.create_sequence();
  REQUIRE(id.ok());
  s.id = id.value();
  std::mt19937 rng(seed);
  append(c, s, n, rng);
  return s;
}

std::vector<float> fixed_q() {
  std::mt19937 rng(99);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> q(kQHeads * kDim);
  for (float& x : q) x = dist(rng);
  return q;
}

// out [q_heads][d] then lse [q_heads].
std::vector<float> attend(kv_cache& c, const seq_model& s) {
  const std::vector<float> q = fixed_q();
  std::vector<float> out(kQHeads * kDim + kQHeads, std::nanf(""));
  const seq_id ids[] = {s.id};
  const status st = c.attend(0, ids, q.data(), out.data(), out.data() + kQHeads * kDim);
  REQUIRE_MESSAGE(st.ok(), st.to_string());
  return out;
}

// The cache's attention over s matches the float64 reference over the rows appended to s.
void check_reference(kv_cache& c, const seq_model& s) {
  const std::vector<float> got = attend(c, s), q = fixed_q();
  const uint64_t n = s.k.size() / kDim;
  std::vector<double> want(kQHeads * kDim), lse(kQHeads);
  reference::attend_rows(s.k.data(), s.v.data(), dtype::kF16, n, kDim, q.data(), kQHeads, 1.0 / std::sqrt(double{kDim}),
                         0.0, want.data(), lse.data());
  double err = 0.0, mag = 0.0;
  for (size_t i = 0; i < want.size(); ++i) {
    err = std::max(err, std::fabs(got[i] - want[i]));
    mag = std::max(mag, std::fabs(want[i]));
  }
  CAPTURE(n);
  CHECK(err <= 1e-5 * std::max(mag, 1e-6));
  for (uint32_t h = 0; h < kQHeads; ++h)
    CHECK(std::fabs(got[kQHeads * kDim + h] - lse[h]) <= 1e-5 * std::max(1.0, std::fabs(lse[h])));
}

// ---- other processes: this binary re-executed ---------------------------------------------------

// --hold URI: create a cache on URI, fill a sequence, say "ready", then wait to be killed.
int run_hold(const std::string& uri) {
  auto c = make(uri);
  if (!c.ok()) {
    std::fprintf(stderr, "hold: %s\n", c.error().to_string().c_str());
    return 1;
  }
  std::mt19937 rng(3);
  seq_model s;
  s.id = c.value()->create_sequence().value();
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> rows(100 * kDim);
  for (float& x : rows) x = dist(rng);
  if (!c.value()->append(s.id, 0, 100, rows.data(), rows.data(), dtype::kF32).ok()) return 1;
  if (std::fputs("ready\n", stdout) < 0 || std::fflush(stdout) != 0) return 1;
  for (;;) ::pause();
}

// --try URI: exit 0 when creating a cache on URI is kBusy (message printed), 1 otherwise.
int run_try(const std::string& uri) {
  auto c = make(uri);
  if (c.ok()) {
    std::fprintf(stderr, "try: the cache was created\n");
    return 1;
  }
  std::fprintf(stderr, "try: %s\n", c.error().to_string().c_str());
  return c.error().code() == errc::kBusy && c.error().message().find("in use") != std::string::npos ? 0 : 1;
}

const char* g_self = nullptr;

// This binary with `mode URI` as a child; with `wait_ready`, returns once it said "ready".
pid_t spawn_self(const char* mode, const std::string& uri, bool wait_ready) {
  int fds[2];
  REQUIRE(::pipe(fds) == 0);
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::dup2(fds[1], 1);
    ::close(fds[0]);
    ::close(fds[1]);
    const char* argv[] = {g_self, mode, uri.c_str(), g_dir.c_str(), g_buffered ? "1" : "0", nullptr};
    ::execv("/proc/self/exe", const_cast<char* const*>(argv));
    std::_Exit(127);
  }
  ::close(fds[1]);
  if (wait_ready) {
    std::string said;
    char ch;
    while (said.find("ready") == std::string::npos && ::read(fds[0], &ch, 1) == 1) said += ch;
    if (said.find("ready") == std::string::npos) {
      int status = 0;
      ::waitpid(pid, &status, 0);
      ::close(fds[0]);
      FAIL("the child could not create its cache (status " << status << ")");
    }
  }
  ::close(fds[0]);
  return pid;
}

int wait_exit(pid_t pid) {
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

}  // namespace

// ---- scenarios --------------------------------------------------------------------------------

TEST_CASE("a second cache on a file in use is busy; the first is unchanged") {
  const std::string file = path_of("busy.kv");
  auto a = must_make(uri_for(file));
  seq_model s = filled_seq(*a, 300, 1);
  check_reference(*a, s);
  const std::vector<float> before = attend(*a, s);

  auto b = make(uri_for(file));
  REQUIRE(!b.ok());
  CHECK(b.error().code() == errc::kBusy);
  CHECK(b.error().message().find(file) != std::string::npos);
  CHECK(b.error().message().find("in use") != std::string::npos);
  // Other options do not make it a different cache.
  CHECK(make(uri_for(file, "keep=1")).error().code() == errc::kBusy);
  CHECK(exists(file));  // the refused cache removed nothing

  // The first cache still holds exactly its rows, and takes more.
  CHECK(attend(*a, s) == before);
  std::mt19937 rng(2);
  append(*a, s, 45, rng);
  check_reference(*a, s);
}

TEST_CASE("another process on a file in use is busy; a killed holder releases it") {
  const std::string file = path_of("shared.kv");
  {
    // This process holds the file: a child is refused.
    auto a = must_make(uri_for(file));
    seq_model s = filled_seq(*a, 200, 4);
    const std::vector<float> before = attend(*a, s);
    CHECK(wait_exit(spawn_self("--try", uri_for(file), false)) == 0);
    CHECK(attend(*a, s) == before);
    check_reference(*a, s);
  }
  CHECK(!exists(file));

  // A child holds it: this process is refused until the child is killed (its drive dies with it).
  const pid_t child = spawn_self("--hold", uri_for(file), true);
  auto refused = make(uri_for(file));
  REQUIRE(!refused.ok());
  CHECK(refused.error().code() == errc::kBusy);
  REQUIRE(::kill(child, SIGKILL) == 0);
  CHECK(wait_exit(child) == 128 + SIGKILL);
  // A drive notices its host's death (PR_SET_PDEATHSIG) a moment later: retry while busy.
  result<std::unique_ptr<kv_cache>> c = status{errc::kBusy, ""};
  for (int i = 0; i < 200; ++i) {
    c = make(uri_for(file));
    if (c.ok() || c.error().code() != errc::kBusy) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  REQUIRE_MESSAGE(c.ok(), c.error().to_string());
  seq_model s = filled_seq(*c.value(), 77, 5);
  check_reference(*c.value(), s);
  c.value().reset();
  // The killed child's file existed when this cache opened it: not this cache's to remove.
  CHECK(exists(file));
  ::unlink(file.c_str());
}

TEST_CASE("files are created 0600, never through a symbolic link") {
  const mode_t old_mask = ::umask(0);  // the mode comes from the open, not from the umask
  const std::string file = path_of("mode.kv");
  {
    auto c = must_make(uri_for(file));
    struct stat st {};
    REQUIRE(::stat(file.c_str(), &st) == 0);
    CHECK((st.st_mode & 07777) == 0600);
  }
  ::umask(old_mask);

  // A link to a file that does not exist: refused, and nothing is created at its target.
  const std::string target = path_of("target.kv"), link = path_of("link.kv");
  REQUIRE(::symlink(target.c_str(), link.c_str()) == 0);
  auto dangling = make(uri_for(link));
  REQUIRE(!dangling.ok());
  CHECK(dangling.error().code() == errc::kInvalidArgument);
  CHECK(dangling.error().message().find("symbolic link") != std::string::npos);
  CHECK(!exists(target));
  // A link to an existing file: refused, the file untouched (its size stays 0), the link stays.
  const int fd = ::open(target.c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
  REQUIRE(fd >= 0);
  ::close(fd);
  auto linked = make(uri_for(link));
  REQUIRE(!linked.ok());
  CHECK(linked.error().code() == errc::kInvalidArgument);
  struct stat st {};
  REQUIRE(::stat(target.c_str(), &st) == 0);
  CHECK(st.st_size == 0);
  CHECK(exists(link));
  ::unlink(link.c_str());
  ::unlink(target.c_str());
}

TEST_CASE("destroy removes the files the cache created, and only those") {
  const std::string file = path_of("gone.kv");
  {
    auto c = must_make(uri_for(file));
    seq_model s = filled_seq(*c, 100, 6);
    CHECK(c->flush().ok());
    CHECK(exists(file));
  }
  CHECK(!exists(file));

  // A new cache on the same path after destroy works and holds only its own rows.
  {
    auto c = must_make(uri_for(file));
    seq_model s = filled_seq(*c, 130, 7);
    check_reference(*c, s);
  }
  CHECK(!exists(file));

  // keep=1 keeps a created file; a file that was there before is never removed.
  {
    auto c = must_make(uri_for(file, "keep=1"));
    (void)filled_seq(*c, 10, 8);
  }
  CHECK(exists(file));
  {
    auto c = must_make(uri_for(file));
    seq_model s = filled_seq(*c, 50, 9);
    check_reference(*c, s);
  }
  CHECK(exists(file));
  ::unlink(file.c_str());
}

TEST_CASE("a failed create leaves no file behind") {
  const std::string file = path_of("failed.kv");
  if (g_backend == "ssd") {
    // The capacity holds no chunk: refused after the file was opened.
    auto c = make(uri_for(file, "capacity=4096"));
    REQUIRE(!c.ok());
    CHECK(c.error().code() == errc::kInvalidArgument);
    CHECK(!exists(file));
  } else {
    // Three drives for one kv head: refused once all three drives run on their flash files.
    auto c = make(uri_for(file, "drives=3"));
    REQUIRE(!c.ok());
    CHECK(c.error().code() == errc::kInvalidArgument);
    for (int d = 0; d < 3; ++d) CHECK_MESSAGE(!exists(file + "." + std::to_string(d)), d);
    // A drive that fails its start-up (a malformed fault seam makes it exit at once).
    REQUIRE(::setenv("INSTINFER_CSD_FAULT", "bogus", 1) == 0);
    auto dead = make(uri_for(file));
    ::unsetenv("INSTINFER_CSD_FAULT");
    REQUIRE(!dead.ok());
    CHECK(dead.error().code() == errc::kDeviceLost);
    CHECK(!exists(file));
    // A drive binary that does not exist.
    auto none = make(uri_for(file, "device=/nonexistent/instinfer-csd"));
    REQUIRE(!none.ok());
    CHECK(none.error().code() == errc::kUnsupported);
    CHECK(!exists(file));
  }
  // A cache on the same path afterwards works.
  auto c = must_make(uri_for(file));
  seq_model s = filled_seq(*c, 40, 10);
  check_reference(*c, s);
}

TEST_CASE("several drives: each flash file is exclusive, private and removed") {
  if (g_backend != "csd") return;
  const std::string file = path_of("multi.kv");
  {
    auto c = make(uri_for(file, "drives=2"), 2);
    REQUIRE_MESSAGE(c.ok(), c.error().to_string());
    for (int d = 0; d < 2; ++d) {
      struct stat st {};
      REQUIRE(::stat((file + "." + std::to_string(d)).c_str(), &st) == 0);
      CHECK((st.st_mode & 0077) == 0);
    }
    // One drive of another cache on the second drive's flash: busy.
    auto b = make(uri_for(file + ".1"));
    REQUIRE(!b.ok());
    CHECK(b.error().code() == errc::kBusy);
  }
  for (int d = 0; d < 2; ++d) CHECK(!exists(file + "." + std::to_string(d)));

  // Two drives, the second one's flash busy: the first one's, created on the way, goes again and
  // the busy one stays with its owner.
  const std::string other = path_of("pair");
  auto holder = must_make(uri_for(other + ".1"));
  seq_model s = filled_seq(*holder, 60, 11);
  auto pair = make(uri_for(other, "drives=2"), 2);
  REQUIRE(!pair.ok());
  CHECK(pair.error().code() == errc::kBusy);
  CHECK(!exists(other + ".0"));
  CHECK(exists(other + ".1"));
  check_reference(*holder, s);
}

int main(int argc, char** argv) {
  g_self = argv[0];
  if (argc == 5 && (std::strcmp(argv[1], "--hold") == 0 || std::strcmp(argv[1], "--try") == 0)) {
    const std::string uri = argv[2];
    g_backend = uri.substr(0, 3);
    g_dir = argv[3];
    g_buffered = argv[4][0] == '1';
    return argv[1][2] == 'h' ? run_hold(uri) : run_try(uri);
  }
  if (argc < 2 || (std::strcmp(argv[1], "ssd") != 0 && std::strcmp(argv[1], "csd") != 0)) {
    std::fprintf(stderr, "usage: %s ssd|csd [doctest options]\n", argv[0]);
    return 2;
  }
  g_backend = argv[1];
  g_dir = test_support::make_scratch_dir("instinfer-files");
  if (g_dir.empty()) skip("cannot make a scratch directory");
  struct cleanup {
    ~cleanup() {
      const std::string cmd = "rm -rf '" + g_dir + "'";
      if (std::system(cmd.c_str()) != 0) std::fprintf(stderr, "could not remove %s\n", g_dir.c_str());
    }
  } remove_dir;
  {
    if (!test_support::direct_io_works(g_dir)) {
      if (g_backend == "ssd") skip(g_dir + " does not support O_DIRECT");
      g_buffered = true;
    }
  }
  const backend_entry* entry = find_backend(g_backend);
  if (!entry || !entry->compiled_in) skip("the " + g_backend + " backend is not built in");
  if (!entry->available()) skip("the " + g_backend + " backend cannot run here");
  std::vector<char*> args{argv[0]};
  for (int i = 2; i < argc; ++i) args.push_back(argv[i]);
  doctest::Context ctx(static_cast<int>(args.size()), args.data());
  return ctx.run();
}
