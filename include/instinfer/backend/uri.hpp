// Backend URIs: "scheme[:path][?key=value&key=value]".
#pragma once

#include <charconv>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "instinfer/core/status.hpp"

namespace instinfer {

struct backend_uri {
  std::string scheme;  // "host", "ssd", "csd", "cuda"
  std::string path;    // after ':' and before '?'; may be empty
  std::vector<std::pair<std::string, std::string>> options;

  std::optional<std::string_view> option(std::string_view key) const noexcept {
    for (const auto& [k, v] : options)
      if (k == key) return std::string_view(v);
    return std::nullopt;
  }

  // Unsigned integer option with optional K/M/G suffix (binary); `fallback` when absent.
  result<uint64_t> option_u64(std::string_view key, uint64_t fallback) const {
    auto v = option(key);
    if (!v) return fallback;
    std::string_view s = *v;
    uint64_t mult = 1;
    if (!s.empty()) {
      switch (s.back()) {
        case 'k':
        case 'K': mult = 1ull << 10; break;
        case 'm':
        case 'M': mult = 1ull << 20; break;
        case 'g':
        case 'G': mult = 1ull << 30; break;
        default: break;
      }
      if (mult != 1) s.remove_suffix(1);
    }
    uint64_t n = 0;
    auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), n);
    if (ec != std::errc{} || p != s.data() + s.size() || s.empty() || (n != 0 && mult > UINT64_MAX / n))
      return status{errc::kInvalidArgument,
                    "option '" + std::string(key) + "' is not an unsigned integer: '" + std::string(*v) + "'"};
    return n * mult;
  }

  result<double> option_f64(std::string_view key, double fallback) const {
    auto v = option(key);
    if (!v) return fallback;
    try {
      size_t used = 0;
      const double d = std::stod(std::string(*v), &used);
      if (used == v->size()) return d;
    } catch (...) {
    }
    return status{errc::kInvalidArgument,
                  "option '" + std::string(key) + "' is not a number: '" + std::string(*v) + "'"};
  }

  bool option_bool(std::string_view key, bool fallback) const noexcept {
    auto v = option(key);
    if (!v) return fallback;
    return *v == "1" || *v == "true" || *v == "on" || *v == "yes" || v->empty();
  }

  static result<backend_uri> parse(std::string_view text) {
    backend_uri uri;
    const auto bad = [&](const std::string& why) {
      return status{errc::kInvalidArgument, "malformed backend URI '" + std::string(text) + "': " + why};
    };
    if (text.empty()) return bad("empty");
    const size_t q = text.find('?');
    std::string_view head = text.substr(0, q);
    const size_t colon = head.find(':');
    uri.scheme = std::string(head.substr(0, colon));
    if (colon != std::string_view::npos) uri.path = std::string(head.substr(colon + 1));
    if (uri.scheme.empty()) return bad("no scheme (expected host, ssd:PATH, csd:PATH or cuda:N)");
    for (char c : uri.scheme)
      if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '_'))
        return bad("scheme must be lower-case letters and digits");
    if (q != std::string_view::npos) {
      std::string_view rest = text.substr(q + 1);
      while (!rest.empty()) {
        const size_t amp = rest.find('&');
        std::string_view kv = rest.substr(0, amp);
        const size_t eq = kv.find('=');
        std::string key(kv.substr(0, eq));
        if (key.empty()) return bad("empty option name");
        uri.options.emplace_back(std::move(key), eq == std::string_view::npos ? "" : std::string(kv.substr(eq + 1)));
        if (amp == std::string_view::npos) break;
        rest = rest.substr(amp + 1);
      }
    }
    return uri;
  }
};

}  // namespace instinfer
