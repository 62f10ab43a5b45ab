// The performance model behind `instinfer-bench paper`: decode throughput of an LLM whose KV
// cache lives on the GPU, in host memory, on SSDs (FlexGen-style) or on CSDs (InstInfer, dense or
// SparF). Everything here is *modelled*: GPU times from a roofline of a stated GPU, link times
// from bandwidths, flash times from the CSD's flash model (include/instinfer/csd/models.hpp, the
// emulated drive's own parameters). Only the SparF page and byte fractions are *measured*, by the
// real SparF kernel on synthetic inputs (cmd_paper.cpp).
//
// One decode step of one layer for a batch of B sequences of context S:
//   GPU linear   the layer's weights once (bandwidth) or 2 * B * params flops, whichever is slower;
//                the LM head is one more such matrix per step
//   KV bytes     B * S * 2 * kv_dim * elem (whole token pages: rounded up to the page)
//   (a) gpu      attention on the GPU: KV bytes at GPU memory bandwidth
//   (b) host     KV in host DRAM, moved to the GPU over the host link each step
//   (c) flexgen  KV on N SSDs, read to the host and on to the GPU: min(N * drive, host link)
//   (d) csd      attention inside N CSDs: flash reads of the KV pages (each drive its heads);
//                only q, k, v in and the output back cross the link
//   (e) sparf    as (d) with SparF: token + column pages read and filtered bytes from the kernel
// With `overlap` the GPU and the KV path (transfer or in-storage attention) run as a pipeline
// over micro-batches (FlexGen's overlap; InstInfer's GPU/CSD pipeline): a layer costs the larger
// of the two; without it they add.
//
// Flash time of a set of page reads and programs on one drive: the slower of the dies
// (pages * tR + programs * tPROG over channels * dies) and the channel buses (bytes moved over
// channels * channel_gbps). With `bus_filter` a read page moves only its selected entries over
// the bus (dual-step loading's in-page filter); dense reads move whole pages.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "instinfer/csd/models.hpp"

namespace instinfer::paper {

struct model_shape {
  std::string name = "opt-13b";
  uint32_t n_layers = 40;
  uint32_t n_heads = 40;
  uint32_t n_kv_heads = 40;
  uint32_t head_dim = 128;
  uint32_t hidden = 5120;
  uint32_t ffn = 20480;
  uint32_t ffn_matrices = 2;  // OPT: up, down; Llama: gate, up, down
  uint32_t vocab = 50272;
  uint32_t elem_bytes = 2;  // fp16

  static model_shape opt_13b() { return {}; }
  static model_shape llama2_13b() { return {"llama-2-13b", 40, 40, 40, 128, 5120, 13824, 3, 32000, 2}; }

  uint64_t kv_dim() const { return uint64_t{n_kv_heads} * head_dim; }
  // Parameters of one layer's matrices (q, o: hidden^2; k, v: hidden * kv_dim; FFN).
  uint64_t layer_params() const {
    return 2ull * hidden * hidden + 2ull * hidden * kv_dim() + uint64_t{ffn_matrices} * hidden * ffn;
  }
  uint64_t weight_bytes() const {
    return (layer_params() * n_layers + 2ull * uint64_t{vocab} * hidden) * elem_bytes;  // + embeddings, LM head
  }
  // K and V bytes of one token, all layers.
  uint64_t kv_bytes_per_token() const { return 2ull * n_layers * kv_dim() * elem_bytes; }
};

struct gpu_model {
  std::string name = "A6000";
  double mem_gbps = 768.0;  // HBM/GDDR bandwidth, 1e9 B/s
  double tflops = 155.0;    // fp16 tensor peak (dense), 1e12 flop/s
  double mem_gb = 48.0;     // memory, 1e9 B
  double mem_eff = 0.8;     // achieved fraction of bandwidth
  double flop_eff = 0.6;    // achieved fraction of peak in decode GEMMs
  double reserve_gb = 2.0;  // activations, workspace, CUDA context

  double linear_s(uint64_t params, uint32_t batch, uint32_t elem) const {
    const double bytes = static_cast<double>(params) * elem;
    const double flops = 2.0 * static_cast<double>(params) * batch;
    return std::max(bytes / (mem_gbps * 1e9 * mem_eff), flops / (tflops * 1e12 * flop_eff));
  }
  double read_s(double bytes) const { return bytes / (mem_gbps * 1e9 * mem_eff); }
};

struct system_model {
  gpu_model gpu{};
  double host_link_gbps = 32.0;  // host <-> GPU (PCIe 4.0 x16 class)
  double host_mem_gb = 256.0;    // host DRAM available for KV (b)
  csd::flash_params flash{};     // per drive: 8 x 1.4 GB/s = 11.2 GB/s internal by default
  csd::link_params link{};       // per drive: PCIe 4.0 x4 = 7 GB/s
  uint32_t drives = 1;
  bool overlap = true;
  bool bus_filter = true;
  double flexgen_eff = 1.0;  // fraction of the ideal SSD read path FlexGen achieves (1: ideal)
  double host_eff = 1.0;     // fraction of the host link host offload achieves (1: ideal)
  double csd_gflops = 0.0;   // in-drive attention compute limit (0: not limiting)
};

enum class method : uint8_t { kGpu = 0, kHost = 1, kFlexgen = 2, kCsdDense = 3, kCsdSparf = 4 };

inline const char* method_name(method m) {
  switch (m) {
    case method::kGpu: return "gpu-resident";
    case method::kHost: return "host-offload";
    case method::kFlexgen: return "flexgen-ssd";
    case method::kCsdDense: return "csd-dense";
    case method::kCsdSparf: return "csd-sparf";
  }
  return "?";
}

// What SparF reads at one context, per (sequence, kv head), as fractions of dense token pages
// and bytes (measured by the kernel). Column fraction: column pages over dense token pages.
struct sparf_fractions {
  double token_pages = 1.0;
  double column_pages = 0.0;
  double bytes = 1.0;  // selected entries moved (token rows + columns + buffered columns) / dense bytes
};

// Seconds per decode step, split by resource (each summed over layers), and the step total.
struct step_time {
  double gpu_s = 0.0;       // GPU linear (+ GPU attention for a, b, c)
  double transfer_s = 0.0;  // KV over host link / SSD path (b, c)
  double device_s = 0.0;    // in-storage attention: flash (d, e), per drive in parallel
  double link_s = 0.0;      // q, k, v, out and commands over the drive links (d, e)
  double total_s = 0.0;
  double flash_pages = 0.0;  // flash pages read per step, all drives (d, e)
};

// Pages of one (sequence, layer, kv head, K|V) at context S: whole pages.
inline double token_pages(uint64_t S, const model_shape& m, uint32_t page_bytes) {
  const uint64_t tpp = std::max<uint64_t>(1, page_bytes / (uint64_t{m.head_dim} * m.elem_bytes));
  return static_cast<double>((S + tpp - 1) / tpp);
}

// One drive's flash time for `pages` reads moving `bus_bytes` and `programs` page programs.
inline double flash_s(const csd::flash_params& f, double pages, double bus_bytes, double programs) {
  const double lanes = static_cast<double>(f.lanes());
  const double die = (pages * f.read_us * 1e-6 + programs * f.program_us * 1e-6) / lanes;
  const double bus = (bus_bytes + programs * f.page_bytes) / (f.internal_gbps() * 1e9);
  return std::max(die, bus);
}

inline step_time decode_step(method meth, const model_shape& m, const system_model& sys, uint32_t batch, uint64_t S,
                             const sparf_fractions& sp) {
  step_time t;
  const double B = batch;
  const double L = m.n_layers;
  const double kv_dim = static_cast<double>(m.kv_dim());
  const uint32_t page = sys.flash.page_bytes;
  // Dense KV read per layer: whole pages of every (sequence, kv head, K|V).
  const double pages_layer = B * m.n_kv_heads * 2.0 * token_pages(S, m, page);
  const double kv_bytes_layer = pages_layer * page;
  const double gpu_lin = sys.gpu.linear_s(m.layer_params(), batch, m.elem_bytes);
  const double lm_head = sys.gpu.linear_s(uint64_t{m.vocab} * m.hidden, batch, m.elem_bytes);
  const double new_kv_layer = B * 2.0 * kv_dim * m.elem_bytes;  // this step's K and V
  double gpu_layer = gpu_lin, kv_layer = 0.0;
  const double N = std::max(1u, sys.drives);
  switch (meth) {
    case method::kGpu: gpu_layer += sys.gpu.read_s(kv_bytes_layer); break;
    case method::kHost:
      gpu_layer += sys.gpu.read_s(kv_bytes_layer);
      kv_layer = (kv_bytes_layer + new_kv_layer) / (sys.host_link_gbps * sys.host_eff * 1e9);
      t.transfer_s = kv_layer * L;
      break;
    case method::kFlexgen: {
      gpu_layer += sys.gpu.read_s(kv_bytes_layer);
      const double drive_gbps = std::min(sys.flash.internal_gbps(), sys.link.gbps) * sys.flexgen_eff;
      const double path_gbps = std::min(N * drive_gbps, sys.host_link_gbps);
      kv_layer = (kv_bytes_layer + new_kv_layer) / (path_gbps * 1e9);
      t.transfer_s = kv_layer * L;
      break;
    }
    case method::kCsdDense:
    case method::kCsdSparf: {
      const bool sparse = meth == method::kCsdSparf;
      const double dense_pages = pages_layer / N;  // per drive: its share of the heads
      double pages = dense_pages, bus = dense_pages * page;
      // Programs: this step's K and V (and the column copy for SparF) in whole pages, amortised.
      double programs = new_kv_layer / N / page;
      if (sparse) {
        pages = dense_pages * (sp.token_pages + sp.column_pages);
        bus = sys.bus_filter ? dense_pages * page * sp.bytes : pages * page;
        programs *= 1.5;
      }
      double dev = flash_s(sys.flash, pages, bus, programs);
      if (sys.csd_gflops > 0.0) {
        const double tokens = sparse ? S * sp.bytes : static_cast<double>(S);
        const double flops = 4.0 * B * m.n_heads * m.head_dim * tokens / N;
        dev = std::max(dev, flops / (sys.csd_gflops * 1e9));
      }
      const double io = B * (3.0 * kv_dim + static_cast<double>(m.n_heads) * m.head_dim) * m.elem_bytes / N;
      const double lnk = io / (sys.link.gbps * 1e9) + 2.0 * sys.link.command_us * 1e-6;  // write qkv + attend
      kv_layer = dev + lnk;
      t.device_s = dev * L;
      t.link_s = lnk * L;
      t.flash_pages = pages * N * L;
      break;
    }
  }
  t.gpu_s = gpu_layer * L + lm_head;
  t.total_s = (sys.overlap ? std::max(gpu_layer, kv_layer) : gpu_layer + kv_layer) * L + lm_head;
  return t;
}

// Whether the configuration fits: GPU-resident KV must fit beside the weights; host offload in DRAM.
inline bool fits(method meth, const model_shape& m, const system_model& sys, uint32_t batch, uint64_t max_context) {
  const double kv = static_cast<double>(m.kv_bytes_per_token()) * batch * static_cast<double>(max_context);
  const double weights = static_cast<double>(m.weight_bytes());
  if (weights + sys.gpu.reserve_gb * 1e9 > sys.gpu.mem_gb * 1e9) return false;
  if (meth == method::kGpu) return weights + kv + sys.gpu.reserve_gb * 1e9 <= sys.gpu.mem_gb * 1e9;
  if (meth == method::kHost) return kv <= sys.host_mem_gb * 1e9;
  return true;
}

}  // namespace instinfer::paper
