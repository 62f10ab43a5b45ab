// The drive (drive.hpp) as one class composed of its components, private to device/csd: the
// command front end (dispatch.cpp: validation, routing, namespace lifetime) and the FTL and
// persistence commands (ftl_commands.cpp) are its members.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <system_error>
#include <unordered_map>
#include <vector>

#include "attend_engine.hpp"
#include "column_ftl.hpp"
#include "drive.hpp"
#include "drive_context.hpp"
#include "group_buffer.hpp"
#include "instinfer/layout/kv_shape.hpp"
#include "kv_namespace.hpp"
#include "namespace_meta.hpp"
#include "page_summaries.hpp"
#include "token_ftl.hpp"

namespace instinfer::csd {

// The u32 chunk ids a command carries as its payload.
inline std::vector<uint32_t> chunk_ids(const std::byte* data, uint32_t n) {
  std::vector<uint32_t> ids(n);
  if (n != 0) std::memcpy(ids.data(), data, ids.size() * 4);  // an empty map: data() may be null
  return ids;
}

// A fixed-size result (identify, stats).
template <class T>
status reply(const T& value, const sq_entry& e, std::byte* res, command_outcome& out) {
  if (e.result_bytes < sizeof(T)) return {errc::kInvalidArgument, "result buffer too small"};
  std::memcpy(res, &value, sizeof value);
  out.result_bytes = sizeof value;
  return {};
}

class drive_impl final : public drive {
 public:
  drive_impl(const drive_options& o, std::unique_ptr<flash_store> store)
      : ctx_(o, std::move(store)), ftl_(ctx_), buffer_(ctx_, ftl_), columns_(ctx_, ftl_), engine_(ctx_, columns_) {}

  identify_data identify() const noexcept override;
  device_stats stats() const noexcept override;
  void drop_queue_pair(uint32_t qp) noexcept override;
  command_outcome execute(uint32_t qp, const sq_entry& e, std::byte* area, uint64_t area_bytes) noexcept override;

 private:
  status dispatch(uint32_t qp, const sq_entry& e, std::byte* area, uint64_t area_bytes, command_outcome& out);
  status do_config(uint32_t qp, const sq_entry& e, const std::byte* data, std::byte* res, command_outcome& out);
  status configure_sparf(kv_namespace& ns, const kv_shape& shape) const;
  status do_write(kv_namespace& ns, const sq_entry& e, const std::byte* data);
  status check_write_chunks(const kv_namespace& ns, const write_kv_args& a, const std::vector<uint32_t>& ids) const;
  status do_map(kv_namespace& ns, const sq_entry& e, const std::byte* data);
  status do_reclaim(kv_namespace& ns, const sq_entry& e, const std::byte* data);
  status do_copy(kv_namespace& ns, const sq_entry& e);
  status do_read(kv_namespace& ns, const sq_entry& e, std::byte* res, command_outcome& out);
  status configure_persist(kv_namespace& ns);
  status do_commit(kv_namespace& ns, const sq_entry& e, const std::byte* data);
  status do_recover(kv_namespace& ns, const sq_entry& e, std::byte* res, command_outcome& out);
  void reset_chunk(kv_namespace& ns, uint64_t chunk) noexcept;
  void free_namespace(kv_namespace& ns) noexcept;

  drive_context ctx_;
  token_ftl ftl_;
  group_buffer buffer_;
  column_ftl columns_;
  attend_engine engine_;
  std::unordered_map<uint32_t, std::unique_ptr<kv_namespace>> spaces_;
  uint32_t next_nsid_ = 1;
  uint64_t next_base_ = 0;
  // The persistent namespace (at most one a drive): the generation of its last commit and the
  // host's tables found at configure (kRecover hands them over).
  uint64_t generation_ = 0;
  std::vector<std::byte> recovered_tables_;
};

}  // namespace instinfer::csd
