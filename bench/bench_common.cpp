#include "bench_common.hpp"

#include <algorithm>
#include <cinttypes>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <thread>

#include <sys/mman.h>

namespace instinfer::bench {

std::map<std::string, command_info>& command_table() {
  static std::map<std::string, command_info> table;
  return table;
}

flags::flags(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    std::string_view a = argv[i];
    if (a.substr(0, 2) != "--") {
      error_ = "unexpected argument '" + std::string(a) + "'";
      return;
    }
    a.remove_prefix(2);
    const size_t eq = a.find('=');
    if (eq != std::string_view::npos) {
      values_[std::string(a.substr(0, eq))] = std::string(a.substr(eq + 1));
    } else if (i + 1 < argc && std::string_view(argv[i + 1]).substr(0, 2) != "--") {
      values_[std::string(a)] = argv[++i];
    } else {
      values_[std::string(a)].assign(1, '1');  // not `= "1"`: gcc 12 -Wrestrict false positive (PR105329)
    }
  }
}

bool flags::has(std::string_view key) const {
  used_[std::string(key)] = true;
  return values_.find(key) != values_.end();
}

std::string flags::str(std::string_view key, std::string_view fallback) const {
  used_[std::string(key)] = true;
  auto it = values_.find(key);
  return it == values_.end() ? std::string(fallback) : it->second;
}

uint64_t flags::u64(std::string_view key, uint64_t fallback) const {
  const std::string s = str(key, "");
  if (s.empty()) return fallback;
  char* end = nullptr;
  uint64_t v = std::strtoull(s.c_str(), &end, 10);
  if (end && (*end == 'k' || *end == 'K')) v <<= 10;
  if (end && (*end == 'm' || *end == 'M')) v <<= 20;
  if (end && (*end == 'g' || *end == 'G')) v <<= 30;
  return v;
}

double flags::f64(std::string_view key, double fallback) const {
  const std::string s = str(key, "");
  return s.empty() ? fallback : std::strtod(s.c_str(), nullptr);
}

std::vector<uint64_t> flags::u64_list(std::string_view key, std::vector<uint64_t> fallback) const {
  const std::string s = str(key, "");
  if (s.empty()) return fallback;
  std::vector<uint64_t> out;
  size_t pos = 0;
  while (pos < s.size()) {
    const size_t comma = std::min(s.find(',', pos), s.size());
    const std::string item = s.substr(pos, comma - pos);  // must outlive `end`
    char* end = nullptr;
    uint64_t v = std::strtoull(item.c_str(), &end, 10);
    if (end && (*end == 'k' || *end == 'K')) v <<= 10;
    out.push_back(v);
    pos = comma + 1;
  }
  return out;
}

bool flags::finish() const {
  for (const auto& [k, v] : values_) {
    if (!used_.count(k)) {
      std::fprintf(stderr, "unknown flag --%s\n", k.c_str());
      return false;
    }
  }
  return ok();
}

void json_line::key(std::string_view k) {
  if (!body_.empty()) body_ += ", ";
  body_ += '"';
  body_ += k;
  body_ += "\": ";
}

json_line& json_line::add(std::string_view k, std::string_view value) {
  key(k);
  body_ += '"';
  for (char c : value) {
    if (c == '"' || c == '\\') body_ += '\\';
    body_ += c;
  }
  body_ += '"';
  return *this;
}

json_line& json_line::add(std::string_view k, double value) {
  key(k);
  char buf[64];
  if (std::isfinite(value))
    std::snprintf(buf, sizeof buf, "%.6g", value);
  else
    std::snprintf(buf, sizeof buf, "null");
  body_ += buf;
  return *this;
}

json_line& json_line::add(std::string_view k, uint64_t value) {
  key(k);
  body_ += std::to_string(value);
  return *this;
}

json_line& json_line::add(std::string_view k, int64_t value) {
  key(k);
  body_ += std::to_string(value);
  return *this;
}

json_line& json_line::add(std::string_view k, bool value) {
  key(k);
  body_ += value ? "true" : "false";
  return *this;
}

void json_line::print(FILE* f) const {
  std::fprintf(f, "%s\n", str().c_str());
  std::fflush(f);
}

namespace {
// Sum of 64-bit words: a read the compiler cannot drop and that vectorises to full-width loads.
uint64_t sum_words(const uint64_t* p, size_t n) {
  uint64_t a = 0, b = 0, c = 0, d = 0;
  size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    a += p[i];
    b += p[i + 1];
    c += p[i + 2];
    d += p[i + 3];
  }
  for (; i < n; ++i) a += p[i];
  return a + b + c + d;
}
}  // namespace

double measure_memory_read_gbps(uint64_t bytes, uint32_t threads, int reps) {
  threads = std::max<uint32_t>(threads, 1);
  const size_t words = bytes / 8;
  void* mem = mmap(nullptr, words * 8, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) return 0.0;
  madvise(mem, words * 8, MADV_HUGEPAGE);
  auto* p = static_cast<uint64_t*>(mem);
  for (size_t i = 0; i < words; ++i) p[i] = i * 0x9e3779b97f4a7c15ull;
  double best = 0.0;
  volatile uint64_t sink = 0;
  for (int r = 0; r < reps; ++r) {
    std::vector<uint64_t> partial(threads);
    const double t0 = now_seconds();
    std::vector<std::thread> pool;
    for (uint32_t t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        const size_t begin = words * t / threads, end = words * (t + 1) / threads;
        partial[t] = sum_words(p + begin, end - begin);
      });
    }
    for (auto& th : pool) th.join();
    const double dt = now_seconds() - t0;
    for (auto v : partial) sink = sink + v;
    best = std::max(best, static_cast<double>(words * 8) / dt / 1e9);
  }
  munmap(mem, words * 8);
  return best;
}

uint64_t peak_rss_bytes() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::strtoull(line.c_str() + 6, nullptr, 10) * 1024;
  }
  return 0;
}

}  // namespace instinfer::bench
