#include "gguf.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <unordered_set>

namespace instinfer::model {

std::string_view gguf_type_name(gguf_type t) noexcept {
  switch (t) {
    case gguf_type::kU8: return "u8";
    case gguf_type::kI8: return "i8";
    case gguf_type::kU16: return "u16";
    case gguf_type::kI16: return "i16";
    case gguf_type::kU32: return "u32";
    case gguf_type::kI32: return "i32";
    case gguf_type::kF32: return "f32";
    case gguf_type::kBool: return "bool";
    case gguf_type::kString: return "string";
    case gguf_type::kArray: return "array";
    case gguf_type::kU64: return "u64";
    case gguf_type::kI64: return "i64";
    case gguf_type::kF64: return "f64";
  }
  return "?";
}

namespace {

status corrupt(uint64_t at, const std::string& what) {
  return {errc::kCorruptData, "GGUF: " + what + " (at byte " + std::to_string(at) + ")"};
}

uint64_t scalar_size(gguf_type t) noexcept {
  switch (t) {
    case gguf_type::kU8:
    case gguf_type::kI8:
    case gguf_type::kBool: return 1;
    case gguf_type::kU16:
    case gguf_type::kI16: return 2;
    case gguf_type::kU32:
    case gguf_type::kI32:
    case gguf_type::kF32: return 4;
    case gguf_type::kU64:
    case gguf_type::kI64:
    case gguf_type::kF64: return 8;
    default: return 0;
  }
}

bool valid_type(uint32_t t) noexcept {
  return t <= static_cast<uint32_t>(gguf_type::kF64);
}

// A bounds-checked little-endian reader over the mapped bytes.
class cursor {
 public:
  explicit cursor(std::span<const std::byte> b) : b_(b) {}
  uint64_t pos() const noexcept { return pos_; }
  uint64_t left() const noexcept { return b_.size() - pos_; }

  template <class T>
  status read(T& out, const char* what) {
    if (left() < sizeof(T)) return corrupt(pos_, std::string("file ends inside ") + what);
    std::memcpy(&out, b_.data() + pos_, sizeof(T));  // little-endian hosts only (x86-64, aarch64)
    pos_ += sizeof(T);
    return {};
  }
  status read_string(std::string_view& out, const char* what) {
    uint64_t n = 0;
    INSTINFER_TRY(read(n, what));
    if (n > gguf_file::kMaxStringBytes)
      return corrupt(pos_ - 8, std::string(what) + " claims " + std::to_string(n) + " bytes (limit " +
                                   std::to_string(gguf_file::kMaxStringBytes) + ")");
    if (n > left())
      return corrupt(pos_ - 8, std::string(what) + " of " + std::to_string(n) + " bytes runs past the end of the file");
    out = std::string_view(reinterpret_cast<const char*>(b_.data() + pos_), n);
    pos_ += n;
    return {};
  }
  status skip(uint64_t n, const char* what) {
    if (n > left()) return corrupt(pos_, std::string(what) + " runs past the end of the file");
    pos_ += n;
    return {};
  }
  std::span<const std::byte> slice(uint64_t from, uint64_t to) const { return b_.subspan(from, to - from); }

 private:
  std::span<const std::byte> b_;
  uint64_t pos_ = 0;
};

status read_scalar(cursor& c, gguf_kv& kv, gguf_type t) {
  switch (t) {
    case gguf_type::kU8: {
      uint8_t v{};
      INSTINFER_TRY(c.read(v, "a u8 value"));
      kv.u = v;
      kv.i = v;
      break;
    }
    case gguf_type::kI8: {
      int8_t v{};
      INSTINFER_TRY(c.read(v, "an i8 value"));
      kv.i = v;
      break;
    }
    case gguf_type::kU16: {
      uint16_t v{};
      INSTINFER_TRY(c.read(v, "a u16 value"));
      kv.u = v;
      kv.i = v;
      break;
    }
    case gguf_type::kI16: {
      int16_t v{};
      INSTINFER_TRY(c.read(v, "an i16 value"));
      kv.i = v;
      break;
    }
    case gguf_type::kU32: {
      uint32_t v{};
      INSTINFER_TRY(c.read(v, "a u32 value"));
      kv.u = v;
      kv.i = v;
      break;
    }
    case gguf_type::kI32: {
      int32_t v{};
      INSTINFER_TRY(c.read(v, "an i32 value"));
      kv.i = v;
      break;
    }
    case gguf_type::kU64: {
      uint64_t v{};
      INSTINFER_TRY(c.read(v, "a u64 value"));
      kv.u = v;
      kv.i = static_cast<int64_t>(v);
      break;
    }
    case gguf_type::kI64: {
      int64_t v{};
      INSTINFER_TRY(c.read(v, "an i64 value"));
      kv.i = v;
      break;
    }
    case gguf_type::kF32: {
      float v{};
      INSTINFER_TRY(c.read(v, "an f32 value"));
      kv.f = v;
      break;
    }
    case gguf_type::kF64: {
      double v{};
      INSTINFER_TRY(c.read(v, "an f64 value"));
      kv.f = v;
      break;
    }
    case gguf_type::kBool: {
      uint8_t v;
      INSTINFER_TRY(c.read(v, "a bool value"));
      if (v > 1) return corrupt(c.pos() - 1, "bool value " + std::to_string(v) + " is neither 0 nor 1");
      kv.u = v;
      break;
    }
    case gguf_type::kString: INSTINFER_TRY(c.read_string(kv.str, "a string value")); break;
    case gguf_type::kArray: return corrupt(c.pos(), "nested array");
  }
  return {};
}

bool is_signed(gguf_type t) noexcept {
  return t == gguf_type::kI8 || t == gguf_type::kI16 || t == gguf_type::kI32 || t == gguf_type::kI64;
}
bool is_unsigned(gguf_type t) noexcept {
  return t == gguf_type::kU8 || t == gguf_type::kU16 || t == gguf_type::kU32 || t == gguf_type::kU64;
}

}  // namespace

gguf_file::~gguf_file() {
  if (map_) munmap(map_, map_size_);
}

result<std::unique_ptr<gguf_file>> gguf_file::open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return status{errc::kIoError, "cannot open model file '" + path + "': " + std::strerror(errno)};
  struct stat st {};
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return status{errc::kInvalidArgument, "'" + path + "' is not a regular file"};
  }
  if (st.st_size < 24) {
    ::close(fd);
    return status{errc::kCorruptData,
                  "GGUF: '" + path + "' is too short to be a GGUF file (" + std::to_string(st.st_size) + " bytes)"};
  }
  void* map = mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ, MAP_PRIVATE, fd, 0);
  const int err = errno;
  ::close(fd);
  if (map == MAP_FAILED) return status{errc::kIoError, "cannot map '" + path + "': " + std::strerror(err)};
  std::unique_ptr<gguf_file> f(new gguf_file());
  f->map_ = map;
  f->map_size_ = static_cast<size_t>(st.st_size);
  f->bytes_ = {static_cast<const std::byte*>(map), f->map_size_};
  if (status s = f->parse_all(); !s.ok()) return status{s.code(), s.message() + " in '" + path + "'"};
  return f;
}

result<std::unique_ptr<gguf_file>> gguf_file::parse(std::span<const std::byte> bytes) {
  std::unique_ptr<gguf_file> f(new gguf_file());
  f->bytes_ = bytes;
  INSTINFER_TRY(f->parse_all());
  return f;
}

status gguf_file::parse_all() {
  cursor c(bytes_);
  uint32_t magic = 0;
  INSTINFER_TRY(c.read(magic, "the magic"));
  if (std::memcmp(bytes_.data(), "GGUF", 4) != 0) return corrupt(0, "bad magic: not a GGUF file");
  INSTINFER_TRY(c.read(version_, "the version"));
  if (version_ != 2 && version_ != 3)
    return {errc::kUnsupported, "GGUF version " + std::to_string(version_) + " is not supported (2 or 3)"};
  uint64_t n_tensors = 0, n_kv = 0;
  INSTINFER_TRY(c.read(n_tensors, "the tensor count"));
  INSTINFER_TRY(c.read(n_kv, "the metadata count"));
  // Each entry takes at least 8 (+ 4 + 1) bytes, so a count beyond the file is a lie: check before reserving.
  if (n_kv > c.left() / 13)
    return corrupt(16, "metadata count " + std::to_string(n_kv) + " exceeds what the file can hold");
  if (n_tensors > c.left() / 32)
    return corrupt(8, "tensor count " + std::to_string(n_tensors) + " exceeds what the file can hold");

  kvs_.reserve(n_kv);
  std::unordered_set<std::string_view> keys;
  for (uint64_t k = 0; k < n_kv; ++k) {
    gguf_kv kv;
    const uint64_t at = c.pos();
    INSTINFER_TRY(c.read_string(kv.key, "a metadata key"));
    if (kv.key.empty()) return corrupt(at, "empty metadata key");
    if (!keys.insert(kv.key).second) return corrupt(at, "duplicate metadata key '" + std::string(kv.key) + "'");
    uint32_t t = 0;
    INSTINFER_TRY(c.read(t, "a metadata type"));
    if (!valid_type(t))
      return corrupt(c.pos() - 4, "unknown metadata type " + std::to_string(t) + " for '" + std::string(kv.key) + "'");
    kv.type = static_cast<gguf_type>(t);
    if (kv.type != gguf_type::kArray) {
      INSTINFER_TRY(read_scalar(c, kv, kv.type));
    } else {
      uint32_t et = 0;
      INSTINFER_TRY(c.read(et, "an array element type"));
      if (!valid_type(et)) return corrupt(c.pos() - 4, "unknown array element type " + std::to_string(et));
      kv.elem_type = static_cast<gguf_type>(et);
      if (kv.elem_type == gguf_type::kArray)
        return corrupt(c.pos() - 4, "nested arrays are not supported ('" + std::string(kv.key) + "')");
      INSTINFER_TRY(c.read(kv.count, "an array length"));
      const uint64_t begin = c.pos();
      if (kv.elem_type == gguf_type::kString) {
        if (kv.count > c.left() / 8)
          return corrupt(begin - 8, "string array '" + std::string(kv.key) + "' claims " + std::to_string(kv.count) +
                                        " elements, more than the file holds");
        kv.strings.resize(kv.count);
        for (auto& s : kv.strings) INSTINFER_TRY(c.read_string(s, "an array string"));
      } else {
        const uint64_t es = scalar_size(kv.elem_type);
        if (kv.count > c.left() / es)
          return corrupt(begin - 8, "array '" + std::string(kv.key) + "' of " + std::to_string(kv.count) +
                                        " elements runs past the end of the file");
        INSTINFER_TRY(c.skip(kv.count * es, "an array"));
      }
      kv.raw = c.slice(begin, c.pos());
    }
    kvs_.push_back(std::move(kv));
  }

  if (const gguf_kv* a = find("general.alignment")) {
    if (!is_unsigned(a->type) || a->u == 0 || (a->u & (a->u - 1)) != 0 || a->u > 65536)
      return corrupt(0, "general.alignment must be a power of two up to 65536");
    alignment_ = a->u;
  }

  tensors_.reserve(n_tensors);
  std::unordered_set<std::string_view> names;
  for (uint64_t i = 0; i < n_tensors; ++i) {
    gguf_tensor t;
    const uint64_t at = c.pos();
    INSTINFER_TRY(c.read_string(t.name, "a tensor name"));
    if (t.name.empty()) return corrupt(at, "empty tensor name");
    if (!names.insert(t.name).second) return corrupt(at, "duplicate tensor '" + std::string(t.name) + "'");
    const std::string name(t.name);
    INSTINFER_TRY(c.read(t.n_dims, "a tensor rank"));
    if (t.n_dims == 0 || t.n_dims > kMaxDims)
      return corrupt(c.pos() - 4, "tensor '" + name + "' has rank " + std::to_string(t.n_dims) + " (1 to 4 allowed)");
    uint64_t total = 1;
    for (uint32_t d = 0; d < t.n_dims; ++d) {
      INSTINFER_TRY(c.read(t.ne[d], "a tensor dimension"));
      if (t.ne[d] == 0 || t.ne[d] > (1ull << 40) || total > (1ull << 50) / t.ne[d])
        return corrupt(c.pos() - 8, "tensor '" + name + "' has an absurd dimension " + std::to_string(t.ne[d]));
      total *= t.ne[d];
    }
    uint32_t type = 0;
    INSTINFER_TRY(c.read(type, "a tensor type"));
    const auto gt = to_ggml_type(type);
    if (!gt)
      return {errc::kUnsupported, "GGUF: tensor '" + name + "' has type " + std::string(ggml_type_name(type)) +
                                      " (id " + std::to_string(type) +
                                      "), which is not supported (f32, f16, bf16, q4_0, q4_1, q8_0)"};
    t.type = *gt;
    if (t.ne[0] % ggml_block_size(t.type) != 0)
      return corrupt(c.pos() - 4, "tensor '" + name + "' row of " + std::to_string(t.ne[0]) +
                                      " weights is not a multiple of the " + std::string(ggml_type_name(type)) +
                                      " block size");
    INSTINFER_TRY(c.read(t.offset, "a tensor offset"));
    t.n_bytes = t.row_bytes() * t.n_rows();
    tensors_.push_back(t);
  }

  const uint64_t data_start = (c.pos() + alignment_ - 1) / alignment_ * alignment_;
  if (data_start > bytes_.size() && n_tensors > 0) return corrupt(c.pos(), "file ends before the tensor data");
  const uint64_t data_size = bytes_.size() > data_start ? bytes_.size() - data_start : 0;
  for (auto& t : tensors_) {
    if (t.offset % alignment_ != 0)
      return corrupt(data_start, "tensor '" + std::string(t.name) + "' offset " + std::to_string(t.offset) +
                                     " is not aligned to " + std::to_string(alignment_));
    if (t.offset > data_size || t.n_bytes > data_size - t.offset)
      return corrupt(data_start + std::min(t.offset, data_size),
                     "tensor '" + std::string(t.name) + "' (" + std::to_string(t.n_bytes) + " bytes at offset " +
                         std::to_string(t.offset) + ") lies outside the file's " + std::to_string(data_size) +
                         " data bytes");
    t.data = bytes_.data() + data_start + t.offset;
  }
  return {};
}

const gguf_kv* gguf_file::find(std::string_view key) const noexcept {
  for (const auto& kv : kvs_)
    if (kv.key == key) return &kv;
  return nullptr;
}

const gguf_tensor* gguf_file::tensor(std::string_view name) const noexcept {
  for (const auto& t : tensors_)
    if (t.name == name) return &t;
  return nullptr;
}

namespace {
status missing(std::string_view key) {
  return {errc::kCorruptData, "GGUF: metadata key '" + std::string(key) + "' is missing"};
}
status wrong(const gguf_kv& kv, const char* want) {
  return {errc::kCorruptData, "GGUF: metadata key '" + std::string(kv.key) + "' has type " +
                                  std::string(gguf_type_name(kv.type)) + ", expected " + want};
}
}  // namespace

result<uint64_t> gguf_file::get_u64(std::string_view key) const {
  const gguf_kv* kv = find(key);
  if (!kv) return missing(key);
  if (is_unsigned(kv->type)) return kv->u;
  if (is_signed(kv->type) && kv->i >= 0) return static_cast<uint64_t>(kv->i);
  return wrong(*kv, "a non-negative integer");
}

result<double> gguf_file::get_f64(std::string_view key) const {
  const gguf_kv* kv = find(key);
  if (!kv) return missing(key);
  if (kv->type == gguf_type::kF32 || kv->type == gguf_type::kF64) return kv->f;
  return wrong(*kv, "a float");
}

result<std::string_view> gguf_file::get_string(std::string_view key) const {
  const gguf_kv* kv = find(key);
  if (!kv) return missing(key);
  if (kv->type == gguf_type::kString) return kv->str;
  return wrong(*kv, "a string");
}

result<bool> gguf_file::get_bool(std::string_view key) const {
  const gguf_kv* kv = find(key);
  if (!kv) return missing(key);
  if (kv->type == gguf_type::kBool) return kv->u != 0;
  return wrong(*kv, "a bool");
}

result<std::span<const std::string_view>> gguf_file::get_string_array(std::string_view key) const {
  const gguf_kv* kv = find(key);
  if (!kv) return missing(key);
  if (kv->type != gguf_type::kArray || kv->elem_type != gguf_type::kString) return wrong(*kv, "an array of strings");
  return std::span<const std::string_view>(kv->strings);
}

result<std::vector<int64_t>> gguf_file::get_int_array(std::string_view key) const {
  const gguf_kv* kv = find(key);
  if (!kv) return missing(key);
  if (kv->type != gguf_type::kArray || !(is_signed(kv->elem_type) || is_unsigned(kv->elem_type)))
    return wrong(*kv, "an array of integers");
  std::vector<int64_t> out(kv->count);
  const uint64_t es = scalar_size(kv->elem_type);
  for (uint64_t i = 0; i < kv->count; ++i) {
    const std::byte* p = kv->raw.data() + i * es;
    switch (kv->elem_type) {
      case gguf_type::kU8: {
        uint8_t v;
        std::memcpy(&v, p, 1);
        out[i] = v;
        break;
      }
      case gguf_type::kI8: {
        int8_t v;
        std::memcpy(&v, p, 1);
        out[i] = v;
        break;
      }
      case gguf_type::kU16: {
        uint16_t v;
        std::memcpy(&v, p, 2);
        out[i] = v;
        break;
      }
      case gguf_type::kI16: {
        int16_t v;
        std::memcpy(&v, p, 2);
        out[i] = v;
        break;
      }
      case gguf_type::kU32: {
        uint32_t v;
        std::memcpy(&v, p, 4);
        out[i] = v;
        break;
      }
      case gguf_type::kI32: {
        int32_t v;
        std::memcpy(&v, p, 4);
        out[i] = v;
        break;
      }
      default: {
        int64_t v;
        std::memcpy(&v, p, 8);
        out[i] = v;
        break;
      }
    }
  }
  return out;
}

result<std::vector<float>> gguf_file::get_f32_array(std::string_view key) const {
  const gguf_kv* kv = find(key);
  if (!kv) return missing(key);
  if (kv->type != gguf_type::kArray || kv->elem_type != gguf_type::kF32) return wrong(*kv, "an array of f32");
  std::vector<float> out(kv->count);
  if (kv->count) std::memcpy(out.data(), kv->raw.data(), kv->count * 4);
  return out;
}

}  // namespace instinfer::model
