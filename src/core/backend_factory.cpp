// URI -> backend. Components add themselves with a compile definition (INSTINFER_WITH_<X>)
// and a make_<x>_backend function declared in their public header.
#include <memory>
#include <string>

#include "instinfer/backend/backend.hpp"
#include "instinfer/backend/host_backend.hpp"

#if INSTINFER_WITH_SSD
#include "instinfer/backend/ssd_backend.hpp"
#endif
#if INSTINFER_WITH_CSD
#include "instinfer/backend/csd_backend.hpp"
#endif
#if INSTINFER_WITH_CUDA
#include "instinfer/backend/cuda_backend.hpp"
#endif

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

[[maybe_unused]] status not_built(const std::string& scheme) {
  return {errc::kUnsupported, "backend '" + scheme + "' is not built into this instinfer"};
}
}  // namespace

result<std::unique_ptr<backend>> make_backend(std::string_view text) {
  auto parsed = backend_uri::parse(text);
  if (!parsed.ok()) return parsed.error();
  const backend_uri& uri = parsed.value();
  if (uri.scheme == "host") return make_host_backend(uri);
  if (uri.scheme == "ssd") {
#if INSTINFER_WITH_SSD
    return make_ssd_backend(uri);
#else
    return not_built(uri.scheme);
#endif
  }
  if (uri.scheme == "csd") {
#if INSTINFER_WITH_CSD
    return make_csd_backend(uri);
#else
    return not_built(uri.scheme);
#endif
  }
  if (uri.scheme == "cuda") {
#if INSTINFER_WITH_CUDA
    return make_cuda_backend(uri);
#else
    return not_built(uri.scheme);
#endif
  }
  return status{errc::kInvalidArgument, "unknown backend scheme '" + uri.scheme + "' in '" + std::string(text) +
                                            "' (known: " + describe_backends() + ")"};
}

std::string describe_backends() {
  std::string s = "host";
#if INSTINFER_WITH_SSD
  s += ", ssd:PATH";
#endif
#if INSTINFER_WITH_CSD
  s += ", csd:PATH";
#endif
#if INSTINFER_WITH_CUDA
  s += ", cuda:N";
#endif
  return s;
}

}  // namespace instinfer
