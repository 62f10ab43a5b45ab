// Shared pieces of instinfer-bench: the subcommand registry, a tiny flag parser, JSON lines,
// and reference bandwidth measurements taken in the same run as the thing measured.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "instinfer/attention/decode.hpp"  // cpu_isa

namespace instinfer::bench {

using command_fn = std::function<int(int argc, char** argv)>;

struct command_info {
  command_fn run;
  std::string help;
};

std::map<std::string, command_info>& command_table();

// Registers a subcommand at static-initialisation time (bench sources are linked directly).
struct command_registrar {
  command_registrar(const std::string& name, const std::string& help, command_fn fn) {
    command_table()[name] = {std::move(fn), help};
  }
};

// --key value / --key=value / --flag. Unknown flags are an error (printed with the usage).
class flags {
 public:
  flags(int argc, char** argv);
  bool ok() const { return error_.empty(); }
  const std::string& error() const { return error_; }
  bool has(std::string_view key) const;
  std::string str(std::string_view key, std::string_view fallback) const;
  uint64_t u64(std::string_view key, uint64_t fallback) const;
  double f64(std::string_view key, double fallback) const;
  // Comma-separated list of integers ("1024,4096").
  std::vector<uint64_t> u64_list(std::string_view key, std::vector<uint64_t> fallback) const;
  // Keys that were given but never read: reported as errors by finish().
  bool finish() const;

 private:
  std::map<std::string, std::string, std::less<>> values_;
  mutable std::map<std::string, bool, std::less<>> used_;
  std::string error_;
};

// One JSON object on one line.
class json_line {
 public:
  json_line& add(std::string_view key, std::string_view value);
  json_line& add(std::string_view key, const char* value) { return add(key, std::string_view(value)); }
  json_line& add(std::string_view key, double value);
  json_line& add(std::string_view key, uint64_t value);
  json_line& add(std::string_view key, int64_t value);
  json_line& add(std::string_view key, uint32_t value) { return add(key, static_cast<uint64_t>(value)); }
  json_line& add(std::string_view key, int value) { return add(key, static_cast<int64_t>(value)); }
  json_line& add(std::string_view key, bool value);
  std::string str() const { return "{" + body_ + "}"; }
  void print(FILE* f = stdout) const;

 private:
  void key(std::string_view k);
  std::string body_;
};

inline double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Streaming read bandwidth (GB/s, 1e9) of `bytes` bytes of memory with `threads` threads, loads as
// wide as `isa`'s (the kernels' dispatch), best of `reps` passes after a warm-up pass; the threads
// start before the timed region. The machine's reference for memory-bound kernels.
double measure_memory_read_gbps(uint64_t bytes, uint32_t threads, cpu_isa isa, int reps = 7);

// Peak f32 multiply-add throughput (GFMA/s: lane multiply-adds per second, 1e9) of `threads`
// threads with `isa`'s widest registers (the kernels' dispatch), best of `reps` passes after a
// warm-up. The machine's reference for compute-bound kernels: a core whose FMA units are narrower
// than its registers (Zen 4 runs AVX-512 as two 256-bit halves) shows it here.
double measure_fma_gflops(uint32_t threads, cpu_isa isa, int reps = 9);

// Reduced-precision dot-product throughput (products per second, 1e9) of `threads` threads, for
// the instructions a reduced-precision kernel path would use: AVX-512 vdpbf16ps (bf16 pairs into
// f32) and VNNI vpdpbusd (u8 x s8 quads into i32). Empty where the CPU lacks them (or, on Arm, not
// measured yet); JSON reports that as "absent".
struct reduced_peaks {
  std::optional<double> bf16_gmacs;
  std::optional<double> vnni_gmacs;
};
reduced_peaks measure_reduced_peaks(uint32_t threads, int reps = 9);
// Adds bf16_dot_gmacs and vnni_gmacs (a number, or "absent").
void add_reduced_peaks(json_line& line, const reduced_peaks& r);

// The roofline of a kernel that performs `fma_per_byte` multiply-adds per byte it reads:
// min(read bandwidth, FMA peak / fma_per_byte), and achieved bandwidth over it.
struct roofline {
  double compute_gbps = 0;  // the bandwidth the FMA peak allows
  double gbps = 0;          // min(read, compute)
  double ratio = 0;         // achieved / gbps
  bool compute_bound = false;
};
roofline roofline_of(double read_gbps, double fma_gflops, double fma_per_byte, double achieved_gbps);

// Peak resident set size of this process in bytes (VmHWM).
uint64_t peak_rss_bytes();

}  // namespace instinfer::bench
