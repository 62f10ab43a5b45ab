// The backend registry: URI scheme -> backend model, one table for every scheme this library
// knows, built from the kv_backend concept (kScheme, compiled_in(), available()).
//
// A scheme that is not compiled in refuses with kUnsupported; one that is compiled in but not
// usable here (no GPU, the drive binary not found, no io_uring) still gets its factory call,
// because a URI option can supply what the probe missed (csd:?device=PATH), and a failure then
// says what the probe found.
#pragma once

#include <memory>
#include <span>
#include <string>
#include <string_view>

#include "instinfer/backend/backend.hpp"
#include "instinfer/backend/uri.hpp"
#include "instinfer/core/status.hpp"

namespace instinfer {

struct backend_entry {
  std::string_view scheme;  // "host", "ssd", ...
  std::string_view usage;   // the URI form: "ssd:PATH"
  bool compiled_in = false;
  bool (*available)() noexcept = nullptr;  // probed at run time
  result<std::unique_ptr<backend>> (*make)(const backend_uri& uri) = nullptr;
};

// The entry of a backend model B (a kv_backend) with its URI factory.
template <kv_backend B>
constexpr backend_entry make_backend_entry(std::string_view usage,
                                           result<std::unique_ptr<backend>> (*make)(const backend_uri&)) noexcept {
  return {B::kScheme, usage, B::compiled_in(), &B::available, make};
}

// Every scheme of this build, compiled in or not, in a fixed order (host first).
std::span<const backend_entry> registered_backends() noexcept;

// The entry for a scheme; null when the scheme is unknown.
const backend_entry* find_backend(std::string_view scheme) noexcept;

}  // namespace instinfer
