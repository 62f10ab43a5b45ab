// A validating reader of GGUF files (the llama.cpp model format, versions 2 and 3).
//
// The file is memory-mapped read-only. Every length, count, offset and type read from it is
// checked against the bytes that are really there before it is used, so a truncated, corrupted
// or hostile file yields an errc::kCorruptData (or kUnsupported) status with the byte offset of
// the problem, never a crash or an allocation larger than the file itself.
//
// Layout (little endian): magic "GGUF", u32 version, u64 n_tensors, u64 n_kv,
// n_kv × (string key, u32 type, value), n_tensors × (string name, u32 n_dims, n_dims × u64 ne,
// u32 ggml_type, u64 offset), padding to `general.alignment` (default 32), tensor data.
// A string is u64 length + bytes; an array is u32 element type + u64 count + elements.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "instinfer/core/status.hpp"
#include "quant.hpp"

namespace instinfer::model {

enum class gguf_type : uint32_t {
  kU8 = 0,
  kI8 = 1,
  kU16 = 2,
  kI16 = 3,
  kU32 = 4,
  kI32 = 5,
  kF32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kU64 = 10,
  kI64 = 11,
  kF64 = 12,
};

std::string_view gguf_type_name(gguf_type t) noexcept;

// One metadata entry. Scalars are decoded; arrays stay in the mapping and are read through
// gguf_file's typed accessors (the element count was checked against the file size).
struct gguf_kv {
  std::string_view key;
  gguf_type type = gguf_type::kU8;
  gguf_type elem_type = gguf_type::kU8;   // arrays only
  uint64_t count = 0;                     // arrays only
  uint64_t u = 0;                         // unsigned / bool scalars
  int64_t i = 0;                          // signed scalars
  double f = 0.0;                         // float scalars
  std::string_view str;                   // string scalars
  std::span<const std::byte> raw;         // arrays: the encoded elements
  std::vector<std::string_view> strings;  // arrays of strings, decoded once
};

struct gguf_tensor {
  std::string_view name;
  uint32_t n_dims = 0;
  uint64_t ne[4] = {1, 1, 1, 1};  // ne[0] is the contiguous (row) dimension
  ggml_type type = ggml_type::kF32;
  uint64_t offset = 0;  // relative to the data section
  uint64_t n_bytes = 0;
  const std::byte* data = nullptr;

  uint64_t n_elements() const noexcept { return ne[0] * ne[1] * ne[2] * ne[3]; }
  uint64_t n_rows() const noexcept { return ne[1] * ne[2] * ne[3]; }
  uint64_t row_bytes() const noexcept { return ggml_row_bytes(type, ne[0]); }
};

class gguf_file {
 public:
  // Map and parse a file. Limits guard against hostile headers (see kMax* below).
  static result<std::unique_ptr<gguf_file>> open(const std::string& path);
  // Parse an in-memory image (tests; the bytes must outlive the gguf_file).
  static result<std::unique_ptr<gguf_file>> parse(std::span<const std::byte> bytes);
  ~gguf_file();
  gguf_file(const gguf_file&) = delete;
  gguf_file& operator=(const gguf_file&) = delete;

  static constexpr uint64_t kMaxStringBytes = 1ull << 24;  // 16 MiB: a chat template is a few KiB
  static constexpr uint32_t kMaxDims = 4;

  uint32_t version() const noexcept { return version_; }
  uint64_t alignment() const noexcept { return alignment_; }
  std::span<const gguf_kv> metadata() const noexcept { return kvs_; }
  std::span<const gguf_tensor> tensors() const noexcept { return tensors_; }
  uint64_t file_size() const noexcept { return bytes_.size(); }

  const gguf_kv* find(std::string_view key) const noexcept;
  const gguf_tensor* tensor(std::string_view name) const noexcept;

  // Typed getters: a missing key or a wrong type is a clear error naming the key.
  result<uint64_t> get_u64(std::string_view key) const;  // any unsigned or non-negative signed integer
  result<double> get_f64(std::string_view key) const;    // f32 / f64
  result<std::string_view> get_string(std::string_view key) const;
  result<bool> get_bool(std::string_view key) const;
  result<std::span<const std::string_view>> get_string_array(std::string_view key) const;
  result<std::vector<int64_t>> get_int_array(std::string_view key) const;
  result<std::vector<float>> get_f32_array(std::string_view key) const;

 private:
  gguf_file() = default;
  status parse_all();

  std::span<const std::byte> bytes_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  std::vector<gguf_kv> kvs_;
  std::vector<gguf_tensor> tensors_;
};

}  // namespace instinfer::model
