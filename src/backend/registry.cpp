// URI -> backend through the registry table (include/instinfer/backend/registry.hpp).
#include "instinfer/backend/registry.hpp"

#include <array>
#include <memory>
#include <string>

#include "instinfer/backend/csd_backend.hpp"
#include "instinfer/backend/cuda_backend.hpp"
#include "instinfer/backend/host_backend.hpp"
#include "instinfer/backend/ssd_backend.hpp"

namespace instinfer {

namespace {
result<std::unique_ptr<backend>> make_host_backend(const backend_uri& uri) {
  if (!uri.path.empty())
    return status{errc::kInvalidArgument, "the host backend takes no path ('host' or 'host:?hugepages=0')"};
  for (const auto& [key, value] : uri.options) {
    if (key != "hugepages")
      return status{errc::kInvalidArgument, "unknown host backend option '" + key + "' (known: hugepages)"};
  }
  host_backend_options options;
  options.try_hugetlb = uri.option_bool("hugepages", true);
  try {
    return std::unique_ptr<backend>(std::make_unique<host_backend>(options));
  } catch (const std::bad_alloc&) {
    return status{errc::kOutOfMemory, "host backend"};
  }
}

constexpr std::array kBackends = {
    make_backend_entry<host_backend>("host", &make_host_backend),
    make_backend_entry<ssd_backend>("ssd:PATH", &make_ssd_backend),
    make_backend_entry<csd_backend>("csd:PATH", &make_csd_backend),
    make_backend_entry<cuda_backend>("cuda:N", &make_cuda_backend),
};

std::string known_schemes() {
  std::string s;
  for (const backend_entry& e : kBackends) s += (s.empty() ? "" : ", ") + std::string(e.usage);
  return s;
}
}  // namespace

std::span<const backend_entry> registered_backends() noexcept {
  return kBackends;
}

const backend_entry* find_backend(std::string_view scheme) noexcept {
  for (const backend_entry& e : kBackends)
    if (e.scheme == scheme) return &e;
  return nullptr;
}

result<std::unique_ptr<backend>> make_backend(std::string_view text) {
  auto parsed = backend_uri::parse(text);
  if (!parsed.ok()) return parsed.error();
  const backend_uri& uri = parsed.value();
  const backend_entry* e = find_backend(uri.scheme);
  if (e == nullptr)
    return status{errc::kInvalidArgument, "unknown backend scheme '" + uri.scheme + "' in '" + std::string(text) +
                                              "' (known: " + known_schemes() + ")"};
  if (!e->compiled_in)
    return status{errc::kUnsupported, "backend '" + uri.scheme + "' is not built into this instinfer"};
  auto made = e->make(uri);
  if (!made.ok() && !e->available())
    return status{made.error().code(), made.error().message() + " (backend '" + uri.scheme +
                                           "' is not available on this machine: " + describe_backends() + ")"};
  return made;
}

std::string describe_backends() {
  std::string s;
  for (const backend_entry& e : kBackends) {
    if (!e.compiled_in) continue;
    s += (s.empty() ? "" : ", ") + std::string(e.usage);
    if (!e.available()) s += " (not usable here)";
  }
  return s;
}

}  // namespace instinfer
