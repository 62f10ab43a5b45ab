#include "group_buffers.hpp"

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>

namespace instinfer::ssd {

namespace {
constexpr uint64_t kMaxWriteBytes = 4ull << 20;  // largest gathered write
}  // namespace

group_buffers::~group_buffers() {
  for (auto& b : buffers_) std::free(b.data);
}

status group_buffers::configure(ssd_io& io, const chunk_layout& layout, uint32_t write_batch, chunk_sums* sums) {
  io_ = &io;
  sums_ = sums;
  layout_ = layout;
  chunk_bytes_ = layout.chunk_bytes();
  write_batch_ = write_batch;
  auto h = io.add_handler(*this);
  if (!h.ok()) return h.error();
  handler_ = h.value();
  return {};
}

// ---- buffers ---------------------------------------------------------------------------------

result<uint32_t> group_buffers::get_buffer(chunk_id id) noexcept {
  uint32_t index;
  try {
    if (!free_buffers_.empty()) {
      index = free_buffers_.back();
      free_buffers_.pop_back();
    } else {
      void* p = nullptr;
      if (::posix_memalign(&p, std::max<uint32_t>(4096, io_->file().mem_align), chunk_bytes_) != 0)
        return status{errc::kOutOfMemory, "ssd backend: group buffer of " + std::to_string(chunk_bytes_) + " bytes"};
      if (!dead_buffers_.empty()) {
        index = dead_buffers_.back();
        dead_buffers_.pop_back();
        buffers_[index].data = static_cast<std::byte*>(p);
      } else {
        try {
          buffers_.push_back(group_buffer{static_cast<std::byte*>(p)});
        } catch (...) {
          std::free(p);
          throw;
        }
        index = static_cast<uint32_t>(buffers_.size() - 1);
      }
      buffer_bytes_ += chunk_bytes_;
    }
    buffer_of_[id] = index;
  } catch (...) {
    return status{errc::kOutOfMemory, "ssd backend: group buffer table"};
  }
  auto& b = buffers_[index];
  std::memset(b.data, 0, chunk_bytes_);  // padding of a flushed partial chunk is deterministic
  b.id = id;
  b.n_tokens = 0;
  b.durable_tokens = 0;
  b.sealed = false;
  b.writing = false;
  return index;
}

void group_buffers::free_buffer(uint32_t index) noexcept {
  auto& b = buffers_[index];
  buffer_of_.erase(b.id);
  b.id = kInvalidChunk;
  // Keep a few for reuse; give the rest back so idle memory stays bounded.
  if (free_buffers_.size() < size_t{write_batch_} + 8) {
    try {
      free_buffers_.push_back(index);
      return;
    } catch (...) {
    }
  }
  try {
    dead_buffers_.reserve(buffers_.size());
  } catch (...) {
    return;  // keep it as a free buffer after all: memory stays bounded by the peak
  }
  std::free(b.data);
  b.data = nullptr;
  buffer_bytes_ -= chunk_bytes_;
  dead_buffers_.push_back(index);  // indices stay stable; the entry is reused by get_buffer
}

void group_buffers::drop(chunk_id id) noexcept {
  auto it = buffer_of_.find(id);
  if (it == buffer_of_.end()) return;
  const uint32_t b = it->second;
  sealed_pending_.erase(std::remove(sealed_pending_.begin(), sealed_pending_.end(), b), sealed_pending_.end());
  free_buffer(b);
}

// ---- appends ---------------------------------------------------------------------------------

status group_buffers::make_room_to_seal(const char* what) noexcept {
  // Before touching anything: a failed batch write fails the call with nothing changed.
  if (sealed_pending_.size() >= write_batch_) INSTINFER_TRY(write_sealed_batch());
  try {
    sealed_pending_.reserve(sealed_pending_.size() + 1);
  } catch (...) {
    return {errc::kOutOfMemory, std::string(what) + ": sealed batch"};
  }
  return {};
}

void group_buffers::seal(uint32_t index) noexcept {
  buffers_[index].sealed = true;
  sealed_pending_.push_back(index);  // room was reserved by make_room_to_seal
}

status group_buffers::append(chunk_id id, uint32_t first, uint32_t n, const std::byte* k, const std::byte* v) noexcept {
  auto it = buffer_of_.find(id);
  if (it == buffer_of_.end() && first != 0)
    return {errc::kInvalidArgument,
            "write_tokens: chunk " + std::to_string(id) + " is sealed or was never started; chunks are append-only"};
  if (it != buffer_of_.end() && (buffers_[it->second].sealed || buffers_[it->second].n_tokens != first))
    return {errc::kInvalidArgument, "write_tokens: chunk " + std::to_string(id) + " holds " +
                                        std::to_string(buffers_[it->second].n_tokens) +
                                        " tokens; appends must start there (first = " + std::to_string(first) + ")"};
  const bool seals = first + n == layout_.tokens();
  if (seals) INSTINFER_TRY(make_room_to_seal("write_tokens"));
  uint32_t b;
  if (it == buffer_of_.end()) {
    auto r = get_buffer(id);
    if (!r.ok()) return r.error();
    b = r.value();
  } else {
    b = it->second;
  }
  auto& g = buffers_[b];
  layout_.scatter_rows(g.data, first, n, k, v);
  g.n_tokens = first + n;
  kv_bytes_appended_ += uint64_t{n} * 2 * layout_.n_kv_heads * layout_.page.row_bytes();
  if (seals) seal(b);
  return {};
}

status group_buffers::write_whole(chunk_id id, const std::byte* chunk) noexcept {
  if (buffer_of_.count(id))
    return {errc::kInvalidArgument, "write_chunk: chunk " + std::to_string(id) + " is not fresh"};
  INSTINFER_TRY(make_room_to_seal("write_chunk"));
  auto r = get_buffer(id);
  if (!r.ok()) return r.error();
  auto& g = buffers_[r.value()];
  std::memcpy(g.data, chunk, chunk_bytes_);
  g.n_tokens = layout_.tokens();
  seal(r.value());
  return {};
}

status group_buffers::copy(chunk_id dst, chunk_id src, uint32_t n) noexcept {
  if (buffer_of_.count(dst)) return {errc::kInvalidArgument, "copy_tokens: destination chunk is not fresh"};
  if (auto it = buffer_of_.find(src); it != buffer_of_.end() && buffers_[it->second].n_tokens < n)
    return {errc::kInvalidArgument,
            "copy_tokens: source chunk holds only " + std::to_string(buffers_[it->second].n_tokens) + " tokens"};
  const uint32_t tpp = layout_.tokens();
  const bool seals = n == tpp;
  if (seals) INSTINFER_TRY(make_room_to_seal("copy_tokens"));
  auto r = get_buffer(dst);
  if (!r.ok()) return r.error();
  const uint32_t b = r.value();
  if (auto it = buffer_of_.find(src); it != buffer_of_.end()) {
    layout_.copy_prefix(buffers_[b].data, buffers_[it->second].data, n);
  } else {
    io_->claim_staging();
    status s = io_->read_sync(buffers_[b].data, static_cast<uint32_t>(chunk_bytes_), io_->chunk_offset(src));
    if (!s.ok()) {
      free_buffer(b);
      return s;
    }
    io_->bytes_read += chunk_bytes_;
    if (sums_) {
      if (s = sums_->verify_chunk(src, buffers_[b].data, io_->path()); !s.ok()) {
        free_buffer(b);
        return s;
      }
    }
    // The source's later tokens are not the copy's: clear them in every page.
    const uint32_t row = layout_.page.row_bytes();
    for (uint32_t p = 0; p < layout_.pages_per_chunk() && n < tpp; ++p)
      std::memset(buffers_[b].data + uint64_t{p} * layout_.page.page_bytes + uint64_t{n} * row, 0,
                  uint64_t{tpp - n} * row);
  }
  buffers_[b].n_tokens = n;
  if (seals) seal(b);
  return {};
}

// ---- writes ----------------------------------------------------------------------------------

void group_buffers::on_completion(const io::completion& c) noexcept {
  const uint64_t index = c.payload();
  if (index >= write_runs_.size()) return;  // a run of a batch already given up on
  // A gathered write succeeds or fails as a whole (a short one is a failure for every chunk).
  const int32_t res = transfer_result(c);
  const auto& run = write_runs_[index];
  for (uint32_t j = 0; j < run.count; ++j) {
    auto& g = buffers_[write_order_[run.first + j]];
    g.write_result = res;
    g.writing = false;
  }
}

status group_buffers::plan_write_runs(std::span<const uint32_t> indices) noexcept {
  // Chunks with consecutive slots go out as one gathered write (up to kMaxWriteBytes): the
  // paper's block-sized appends, and far cheaper for the filesystem than many small writes.
  try {
    write_order_.assign(indices.begin(), indices.end());
    iovecs_.resize(indices.size());
    write_runs_.clear();
    write_runs_.reserve(indices.size());
  } catch (...) {
    return {errc::kOutOfMemory, "ssd backend: write batch of " + std::to_string(indices.size()) + " chunks"};
  }
  std::sort(write_order_.begin(), write_order_.end(),
            [&](uint32_t a, uint32_t b) { return buffers_[a].id < buffers_[b].id; });
  const uint32_t max_run = static_cast<uint32_t>(std::max<uint64_t>(1, kMaxWriteBytes / chunk_bytes_));
  for (uint32_t i = 0; i < write_order_.size(); ++i) {
    const uint32_t b = write_order_[i];
    iovecs_[i] = {buffers_[b].data, chunk_bytes_};
    buffers_[b].writing = true;
    buffers_[b].write_result = 0;
    if (!write_runs_.empty()) {
      auto& run = write_runs_.back();
      const uint32_t last = write_order_[run.first + run.count - 1];
      if (run.count < max_run && buffers_[last].id + 1 == buffers_[b].id) {
        ++run.count;
        continue;
      }
    }
    write_runs_.push_back({i, 1});
  }
  return {};
}

status group_buffers::wait_for_writes(std::span<const uint32_t> indices) noexcept {
  // One submission; completions in any order.
  for (;;) {
    bool pending = false;
    for (uint32_t b : indices) pending |= buffers_[b].writing;
    if (!pending) return {};
    status s = io_->reap();
    if (!s.ok()) {
      io_->engine().drain();
      for (uint32_t b : indices) buffers_[b].writing = false;
      return s;
    }
  }
}

status group_buffers::write_buffers(std::span<const uint32_t> indices, bool partial) noexcept {
  INSTINFER_TRY(plan_write_runs(indices));
  status first_error;
  for (uint32_t r = 0; r < write_runs_.size(); ++r) {
    const auto& run = write_runs_[r];
    const uint64_t offset = io_->chunk_offset(buffers_[write_order_[run.first]].id);
    status s = io_->queue_writev(&iovecs_[run.first], run.count, offset, ssd_io::tag(handler_, r));
    if (!s.ok()) {
      for (uint32_t j = 0; j < run.count; ++j) {
        buffers_[write_order_[run.first + j]].writing = false;
        buffers_[write_order_[run.first + j]].write_result = -EIO;
      }
      if (first_error.ok()) first_error = s;
    }
  }
  status waited = wait_for_writes(indices);
  write_runs_.clear();  // stray completions must not match a later batch's runs
  INSTINFER_TRY(waited);
  for (uint32_t b : indices) {
    auto& g = buffers_[b];
    if (g.write_result >= 0 && sums_ != nullptr) {
      // Durable only with its checksums: a commit must be able to describe every flushed chunk.
      if (status r = sums_->record(g.id, g.data, g.n_tokens); !r.ok()) {
        g.write_result = -ENOMEM;
        if (first_error.ok()) first_error = r;
        continue;
      }
    }
    if (g.write_result >= 0) {
      io_->bytes_written += chunk_bytes_;
      g.durable_tokens = g.n_tokens;
    } else if (first_error.ok()) {
      first_error = result_status(g.write_result, std::string("ssd backend: ") +
                                                      (partial ? "flushing the partial" : "writing sealed") +
                                                      " chunk " + std::to_string(g.id) + " to '" + io_->path() +
                                                      "' (kept in host memory, retried later)");
    }
  }
  return first_error;
}

status group_buffers::write_sealed_batch() noexcept {
  if (sealed_pending_.empty()) return {};
  status s = write_buffers(sealed_pending_, false);
  // Written chunks leave host memory; failed ones stay pending, in order.
  size_t keep = 0;
  for (uint32_t b : sealed_pending_) {
    if (buffers_[b].write_result >= 0 && buffers_[b].durable_tokens == buffers_[b].n_tokens)
      free_buffer(b);
    else
      sealed_pending_[keep++] = b;
  }
  sealed_pending_.resize(keep);
  return s;
}

status group_buffers::flush() noexcept {
  INSTINFER_TRY(write_sealed_batch());
  std::vector<uint32_t> tails;
  try {
    for (const auto& [id, b] : buffer_of_)
      if (!buffers_[b].sealed && buffers_[b].n_tokens > buffers_[b].durable_tokens) tails.push_back(b);
  } catch (...) {
    return {errc::kOutOfMemory, "flush"};
  }
  std::sort(tails.begin(), tails.end());
  if (!tails.empty()) INSTINFER_TRY(write_buffers(tails, true));
  return io_->fsync();
}

}  // namespace instinfer::ssd
