// The byte reader both fuzzers decode their inputs with.
#pragma once

#include <cstddef>
#include <cstdint>

namespace instinfer::fuzz {

// Bytes from the front, in the order the seed script (fuzz/corpus/make_seeds.py) writes them;
// zeros once exhausted, so every input decodes to something.
class input {
 public:
  input(const uint8_t* p, size_t n) : p_(p), n_(n) {}
  bool empty() const { return n_ == 0; }
  uint8_t u8() {
    if (n_ == 0) return 0;
    --n_;
    return *p_++;
  }
  uint32_t u16() { return u8() | uint32_t{u8()} << 8; }
  uint32_t u32() { return u16() | u16() << 16; }

 private:
  const uint8_t* p_;
  size_t n_;
};

}  // namespace instinfer::fuzz
