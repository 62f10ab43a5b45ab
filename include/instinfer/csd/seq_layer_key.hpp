// The (sequence, layer) key of a page table: the drive's page tables and SparF column tails, and the
// host backend's mirror of what each drive holds, are all keyed by it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>

namespace instinfer::csd {

struct seq_layer_key {
  uint64_t seq = 0;
  uint32_t layer = 0;
  bool operator==(const seq_layer_key&) const = default;
};

struct seq_layer_hash {
  size_t operator()(const seq_layer_key& k) const noexcept {
    // Fibonacci-mix the sequence so consecutive ids spread; the layer only perturbs it.
    return std::hash<uint64_t>{}(k.seq * 0x9e3779b97f4a7c15ull ^ (uint64_t{k.layer} << 1));
  }
};

}  // namespace instinfer::csd
