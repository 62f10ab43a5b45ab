// CRC32C (Castagnoli, reflected polynomial 0x82F63B78): the one checksum of every self-checking
// format (sequence state, the persistent store's metadata and chunk checksums). On x86-64 with
// SSE4.2 (checked at run time) the crc32 instruction, 8 bytes a step; elsewhere slicing-by-8 in
// portable C++ (about 4x slower; both give the same values).
#pragma once

#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace instinfer {

namespace crc32c_detail {

constexpr std::array<std::array<uint32_t, 256>, 8> make_tables() {
  std::array<std::array<uint32_t, 256>, 8> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1u) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
    t[0][i] = c;
  }
  for (uint32_t i = 0; i < 256; ++i)
    for (size_t s = 1; s < 8; ++s) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xFFu];
  return t;
}
inline constexpr auto kTables = make_tables();

}  // namespace crc32c_detail

// The portable path (also the reference the hardware path is tested against).
inline uint32_t crc32c_portable(const void* data, size_t n, uint32_t crc = 0) noexcept {
  const auto& t = crc32c_detail::kTables;
  const auto* p = static_cast<const unsigned char*>(data);
  crc = ~crc;
  while (n >= 8) {
    uint32_t lo, hi;
    std::memcpy(&lo, p, 4);
    std::memcpy(&hi, p + 4, 4);
    if constexpr (std::endian::native == std::endian::big) {
      lo = __builtin_bswap32(lo);
      hi = __builtin_bswap32(hi);
    }
    lo ^= crc;
    crc = t[7][lo & 0xFFu] ^ t[6][(lo >> 8) & 0xFFu] ^ t[5][(lo >> 16) & 0xFFu] ^ t[4][lo >> 24] ^ t[3][hi & 0xFFu] ^
          t[2][(hi >> 8) & 0xFFu] ^ t[1][(hi >> 16) & 0xFFu] ^ t[0][hi >> 24];
    p += 8;
    n -= 8;
  }
  while (n-- > 0) crc = t[0][(crc ^ *p++) & 0xFFu] ^ (crc >> 8);
  return ~crc;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
namespace crc32c_detail {
__attribute__((target("sse4.2"))) inline uint32_t crc32c_sse42(const void* data, size_t n, uint32_t crc) noexcept {
  const auto* p = static_cast<const unsigned char*>(data);
  uint64_t c = ~crc;
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    c = __builtin_ia32_crc32di(c, w);
    p += 8;
    n -= 8;
  }
  auto c32 = static_cast<uint32_t>(c);
  while (n-- > 0) c32 = __builtin_ia32_crc32qi(c32, *p++);
  return ~c32;
}
inline const bool kHaveSse42 = [] {
  __builtin_cpu_init();  // this may run before libgcc's own constructor
  return __builtin_cpu_supports("sse4.2") != 0;
}();
}  // namespace crc32c_detail
#endif

// crc of n bytes, continuing `crc` (the value returned for the bytes before them; 0 to start).
inline uint32_t crc32c(const void* data, size_t n, uint32_t crc = 0) noexcept {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (crc32c_detail::kHaveSse42) return crc32c_detail::crc32c_sse42(data, n, crc);
#endif
  return crc32c_portable(data, n, crc);
}

}  // namespace instinfer
