// Command-line helpers shared by the generator's programs (instinfer-generate,
// instinfer-sparf-model): strict number parsing, and flags whose bad values end the program with
// a clear message and exit code 2.
#pragma once

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace instinfer::model::cli {

inline bool parse_u32(const char* s, uint32_t& out) {
  char* end = nullptr;
  errno = 0;
  const unsigned long v = std::strtoul(s, &end, 10);
  if (errno || end == s || *end || v > 0xffffffffUL || s[0] == '-') return false;
  out = static_cast<uint32_t>(v);
  return true;
}

inline bool parse_float(const char* s, float& out) {
  char* end = nullptr;
  out = std::strtof(s, &end);
  return end != s && !*end && std::isfinite(out);
}

// A fraction in (0, 1], as a decimal ("0.125") or a ratio ("1/8").
inline bool parse_fraction(const char* s, double& out) {
  char* end = nullptr;
  out = std::strtod(s, &end);
  if (end == s) return false;
  if (*end == '/') {
    const char* d = end + 1;
    const double den = std::strtod(d, &end);
    if (end == d || !(den > 0.0)) return false;
    out /= den;
  }
  return !*end && out > 0.0 && out <= 1.0;  // also rejects NaN and infinities
}

inline double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Walks argv: while (args.next()) { if (args.flag() == "--x") v = args.need("a number"); ... }
class flags {
 public:
  flags(const char* program, int argc, char** argv) : program_(program), argc_(argc), argv_(argv) {}
  bool next() {
    if (++i_ >= argc_) return false;
    flag_ = argv_[i_];
    return true;
  }
  const std::string& flag() const { return flag_; }
  // The flag's value, or exit 2 naming what was expected.
  const char* need(const char* what) {
    if (i_ + 1 >= argc_) {
      std::fprintf(stderr, "%s: %s needs %s\n", program_, flag_.c_str(), what);
      std::exit(2);
    }
    return argv_[++i_];
  }
  [[noreturn]] void bad(const char* value) const {
    std::fprintf(stderr, "%s: bad value '%s' for %s\n", program_, value, flag_.c_str());
    std::exit(2);
  }

 private:
  const char* program_;
  int argc_;
  char** argv_;
  int i_ = 0;
  std::string flag_;
};

}  // namespace instinfer::model::cli
