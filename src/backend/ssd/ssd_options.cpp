// ssd:PATH?... -> ssd_backend_options, every value checked, and the factory entry point.
#include <algorithm>
#include <iterator>
#include <new>

#include "instinfer/backend/ssd_backend.hpp"

namespace instinfer {

result<ssd_backend_options> ssd_backend_options::from_uri(const backend_uri& uri) {
  if (uri.scheme != "ssd") return status{errc::kInvalidArgument, "not an ssd URI (scheme '" + uri.scheme + "')"};
  if (uri.path.empty())
    return status{errc::kInvalidArgument, "ssd backend needs a path: ssd:/path/to/file?queue_depth=32"};
  static constexpr std::string_view kKeys[] = {"queue_depth", "staging", "request", "capacity",      "write_batch",
                                               "buffered",    "sqpoll",  "iopoll",  "single_issuer", "register",
                                               "preallocate", "keep",    "persist", "read_gap"};
  for (const auto& [key, value] : uri.options) {
    if (std::find(std::begin(kKeys), std::end(kKeys), key) == std::end(kKeys))
      return status{errc::kInvalidArgument,
                    "unknown ssd option '" + key +
                        "' (known: queue_depth staging request capacity write_batch buffered "
                        "sqpoll iopoll single_issuer register preallocate keep persist read_gap)"};
  }
  ssd_backend_options o;
  o.path = uri.path;
  auto qd = uri.option_u64("queue_depth", o.queue_depth);
  if (!qd.ok()) return qd.error();
  if (qd.value() == 0 || qd.value() > 4096)
    return status{errc::kInvalidArgument, "queue_depth must be in [1, 4096], got " + std::to_string(qd.value())};
  o.queue_depth = static_cast<uint32_t>(qd.value());
  auto staging = uri.option_u64("staging", o.staging_bytes);
  if (!staging.ok()) return staging.error();
  if (staging.value() == 0 || staging.value() % 4096 != 0 || staging.value() > (1ull << 30))
    return status{errc::kInvalidArgument,
                  "staging must be a non-zero multiple of 4096 bytes up to 1G, got " + std::to_string(staging.value())};
  o.staging_bytes = staging.value();
  auto req = uri.option_u64("request", o.request_bytes);
  if (!req.ok()) return req.error();
  if (req.value() < 4096 || req.value() > (64ull << 20))
    return status{errc::kInvalidArgument, "request must be in [4K, 64M], got " + std::to_string(req.value())};
  o.request_bytes = req.value();
  auto cap = uri.option_u64("capacity", 0);
  if (!cap.ok()) return cap.error();
  o.capacity_bytes = cap.value();
  auto wb = uri.option_u64("write_batch", 0);
  if (!wb.ok()) return wb.error();
  if (wb.value() > 65536)
    return status{errc::kInvalidArgument, "write_batch must be at most 65536, got " + std::to_string(wb.value())};
  o.write_batch = static_cast<uint32_t>(wb.value());
  o.buffered = uri.option_bool("buffered", false);
  o.sqpoll = uri.option_bool("sqpoll", false);
  o.iopoll = uri.option_bool("iopoll", false);
  o.single_issuer = uri.option_bool("single_issuer", true);
  o.register_buffers = uri.option_bool("register", true);
  o.preallocate = uri.option_bool("preallocate", false);
  o.persist = uri.option_bool("persist", false);
  o.keep_file = uri.option_bool("keep", false) || o.persist;  // a persistent store outlives its cache
  if (uri.option("read_gap")) {                               // absent: from the device probe
    auto gap = uri.option_u64("read_gap", 0);
    if (!gap.ok()) return gap.error();
    if (gap.value() > (64ull << 20))
      return status{errc::kInvalidArgument, "read_gap must be at most 64M, got " + std::to_string(gap.value())};
    o.read_gap_bytes = gap.value();
  }
  return o;
}

result<std::unique_ptr<backend>> make_ssd_backend(const backend_uri& uri) {
  auto o = ssd_backend_options::from_uri(uri);
  if (!o.ok()) return o.error();
  std::unique_ptr<backend> b(new (std::nothrow) ssd_backend(std::move(o.value())));
  if (!b) return status{errc::kOutOfMemory, "ssd backend"};
  return b;
}

}  // namespace instinfer
