// The performance model behind `instinfer-bench paper`: decode throughput of an LLM whose KV
// cache lives on the GPU, in host memory, on SSDs (FlexGen-style) or on CSDs (InstInfer, dense or
// SparF). Everything here is *modelled*: GPU times from a roofline of a stated GPU; every flash,
// drive-link and drive-compute time from the emulated drive's own model
// (include/instinfer/csd/models.hpp: flash_timeline, link_params, compute_params, attend_work,
// command_time), called here on the pages the drive would read and program, placed on its lanes
// the way its FTL places them (flash_stripe). There is no second flash model in this file.
//
// One decode step of one layer for a batch of B sequences of context S:
//   GPU linear   the layer's weights once (bandwidth) or 2 * B * params flops, whichever is slower;
//                the LM head is one more such matrix per step
//   KV pages     whole token pages of every (sequence, kv head, K|V) sealed on flash (the
//                partial last chunk sits in the drive's DRAM buffer)
//   (a) gpu      attention on the GPU: KV bytes at GPU memory bandwidth
//   (b) host     KV in host DRAM, moved to the GPU over the host link each step
//   (c) flexgen  KV on N SSDs: each drive reads its pages (flash_timeline) while its link moves
//                them; the host link caps the sum
//   (d) csd      attention inside N CSDs (each drive its kv heads): a write command (this step's
//                K, V: link) then an attend command costing max(link, flash, compute), the
//                drive's command_time; programs of sealed chunks occupy their dies first
//   (e) sparf    as (d) with SparF: column pages, then the token pages holding selected tokens;
//                compute for the approximate scores, the ranking and the exact pass
// With `overlap` the GPU and the KV path (transfer or in-storage attention) run as a pipeline
// over micro-batches (FlexGen's overlap; InstInfer's GPU/CSD pipeline): a layer costs the larger
// of the two; without it they add.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "instinfer/csd/models.hpp"
#include "instinfer/csd/protocol.hpp"

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
  double host_link_gbps = 32.0;   // host <-> GPU (PCIe 4.0 x16 class)
  double host_mem_gb = 256.0;     // host DRAM available for KV (b)
  csd::flash_params flash{};      // per drive: 8 x 1.4 GB/s = 11.2 GB/s internal by default
  csd::link_params link{};        // per drive: PCIe 4.0 x4 = 7 GB/s
  csd::compute_params compute{};  // per drive: the embedded cores (4 x 1.5 GHz x 8 flop/cycle)
  uint32_t drives = 1;
  bool overlap = true;
  double flexgen_eff = 1.0;  // fraction of the ideal SSD read path FlexGen achieves (1: ideal)
  double host_eff = 1.0;     // fraction of the host link host offload achieves (1: ideal)
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

// What SparF reads and computes at one context, per (sequence, kv head). Page fractions are over
// the dense token pages. These are *parameters* of the model: the harness takes them from the
// SparF kernel run on synthetic inputs, where the page budget (page_spread x the fewest pages
// that hold k tokens) sets the token pages (cmd_paper.cpp).
struct sparf_fractions {
  double token_pages = 1.0;
  double column_pages = 0.0;
  double bytes = 1.0;     // entries used / dense bytes (reported; the flash moves whole pages)
  double channels = 1.0;  // r / head_dim: K-column entries per token in the approximate scores
  double tokens = 1.0;    // k / S: tokens of the exact pass
  bool approx = false;    // approximate scores computed (false at compression 1)
};

// Seconds per decode step, split by resource (each summed over layers), and the step total.
struct step_time {
  double gpu_s = 0.0;       // GPU linear (+ GPU attention for a, b, c)
  double transfer_s = 0.0;  // KV over host link / SSD path (b, c)
  double device_s = 0.0;    // (d, e): per drive, write command + max(link, flash, compute) of the attend
  double link_s = 0.0;      // (d, e): drive link, both commands
  double flash_s = 0.0;     // (c, d, e): flash reads (with the programs they wait for), per drive
  double compute_s = 0.0;   // (d, e): the drive's cores
  double program_s = 0.0;   // (d, e): die time of this step's page programs (amortised) per die, per drive
  double total_s = 0.0;
  double flash_pages = 0.0;  // flash pages read per step, all drives (d, e)
};

inline uint32_t tokens_per_page(const model_shape& m, uint32_t page_bytes) {
  return static_cast<uint32_t>(std::max<uint64_t>(1, page_bytes / (uint64_t{m.head_dim} * m.elem_bytes)));
}
// Pages of one (sequence, layer, kv head, K|V) at context S: whole pages.
inline double token_pages(uint64_t S, const model_shape& m, uint32_t page_bytes) {
  const uint64_t tpp = tokens_per_page(m, page_bytes);
  return static_cast<double>((S + tpp - 1) / tpp);
}

// One drive's flash work in one layer of one decode step, on the drive's own timeline.
struct layer_flash {
  double read_ns = 0.0;     // programs issued first, then the reads; when the last read is in
  double program_ns = 0.0;  // die time of the programs
  double pages = 0.0;       // pages read
};

enum class seal : uint8_t { kNone, kTokenChunk, kColumnBlock };

// Pages as the drive's FTL lays them out (token_ftl: chunk i of (seq, layer) on lane
// (flash_stripe + i) % lanes, all of its 2 x heads pages there; column_ftl: a column block's pages
// striped from flash_stripe + 7 b). Only a ppn's lane matters to the timeline.
// `sparse` null: dense reads. `what` says which programs this step issues before the reads.
inline layer_flash csd_layer_flash(const csd::flash_params& f, uint32_t batch, uint32_t heads, uint32_t head_dim,
                                   uint32_t tpp, uint64_t S, uint32_t layer, const sparf_fractions* sparse, seal what,
                                   uint32_t channels_per_column_page = 4, uint32_t column_block_tokens = 512) {
  const uint32_t lanes = f.lanes();
  const uint32_t per_lane = f.blocks_per_die * f.pages_per_block;
  auto ppn = [&](uint64_t lane) { return static_cast<uint32_t>((lane % lanes) * per_lane); };
  const uint64_t chunks = S / tpp;  // sealed chunks (the partial one is in DRAM)
  const uint32_t col_per_head = std::max(1u, head_dim / channels_per_column_page);
  const uint64_t blocks = S / column_block_tokens;
  std::vector<uint32_t> prog, col, tok;
  for (uint32_t b = 0; b < batch; ++b) {
    const uint64_t stripe = csd::flash_stripe(b, layer);
    if (what == seal::kTokenChunk && chunks > 0)
      for (uint32_t p = 0; p < 2 * heads; ++p) prog.push_back(ppn(stripe + chunks - 1));
    if (what == seal::kColumnBlock && blocks > 0)
      for (uint32_t p = 0; p < heads * col_per_head; ++p) prog.push_back(ppn(stripe + 7 * (blocks - 1) + p));
    for (uint32_t h = 0; h < heads; ++h) {
      if (!sparse) {
        for (uint64_t c = 0; c < chunks; ++c) tok.push_back(ppn(stripe + c)), tok.push_back(ppn(stripe + c));
        continue;
      }
      // The token pages holding selected tokens (K and V), spread evenly over the chunks.
      const uint64_t m = std::min<uint64_t>(chunks, static_cast<uint64_t>(std::llround(sparse->token_pages * chunks)));
      for (uint64_t i = 0; i < m; ++i) {
        const uint64_t c = i * chunks / m;
        tok.push_back(ppn(stripe + c)), tok.push_back(ppn(stripe + c));
      }
      // The column pages of the chosen channel groups in every sealed block.
      if (blocks > 0) {
        const double n_col = sparse->column_pages * 2.0 * static_cast<double>(chunks);
        const uint64_t per_block =
            std::min<uint64_t>(col_per_head, static_cast<uint64_t>(std::llround(n_col / static_cast<double>(blocks))));
        for (uint64_t bl = 0; bl < blocks; ++bl)
          for (uint64_t j = 0; j < per_block; ++j) col.push_back(ppn(stripe + 7 * bl + h * col_per_head + j));
      }
    }
  }
  csd::flash_timeline tl(f);
  for (uint32_t p : prog) tl.program(p, 0.0);
  layer_flash r;
  r.program_ns = tl.program_busy_ns();
  r.read_ns = csd::sparse_reads(tl, col.data(), col.size(), tok.data(), tok.size(), 0.0);
  r.pages = static_cast<double>(col.size() + tok.size());
  return r;
}

// Memoises csd_layer_flash (the same layer is asked for by several methods and sweeps).
class flash_cache {
 public:
  layer_flash get(const csd::flash_params& f, uint32_t batch, uint32_t heads, uint32_t head_dim, uint32_t tpp,
                  uint64_t S, uint32_t layer, const sparf_fractions* sparse, seal what) {
    const key k{f.channels,
                f.dies_per_channel,
                f.page_bytes,
                f.channel_gbps,
                f.read_us,
                f.program_us,
                batch,
                heads,
                head_dim,
                tpp,
                S,
                layer,
                sparse ? sparse->token_pages : -1.0,
                sparse ? sparse->column_pages : -1.0,
                static_cast<int>(what)};
    if (auto it = cache_.find(k); it != cache_.end()) return it->second;
    const layer_flash r = csd_layer_flash(f, batch, heads, head_dim, tpp, S, layer, sparse, what);
    cache_.emplace(k, r);
    return r;
  }

 private:
  using key = std::tuple<uint32_t, uint32_t, uint32_t, double, double, double, uint32_t, uint32_t, uint32_t, uint32_t,
                         uint64_t, uint32_t, double, double, int>;
  std::map<key, layer_flash> cache_;
};

inline step_time decode_step(method meth, const model_shape& m, const system_model& sys, uint32_t batch, uint64_t S,
                             const sparf_fractions& sp, flash_cache& fc, uint32_t layer = 0) {
  step_time t;
  const double B = batch;
  const double L = m.n_layers;
  const double kv_dim = static_cast<double>(m.kv_dim());
  const uint32_t page = sys.flash.page_bytes;
  const uint32_t tpp = tokens_per_page(m, page);
  // Dense KV read per layer: whole pages of every (sequence, kv head, K|V).
  const double pages_layer = B * m.n_kv_heads * 2.0 * token_pages(S, m, page);
  const double kv_bytes_layer = pages_layer * page;
  const double gpu_lin = sys.gpu.linear_s(m.layer_params(), batch, m.elem_bytes);
  const double lm_head = sys.gpu.linear_s(uint64_t{m.vocab} * m.hidden, batch, m.elem_bytes);
  const double new_kv_layer = B * 2.0 * kv_dim * m.elem_bytes;  // this step's K and V
  double gpu_layer = gpu_lin, kv_layer = 0.0;
  const uint32_t N = std::max(1u, sys.drives);
  const uint32_t heads = (m.n_kv_heads + N - 1) / N;  // per drive (the busiest)
  const uint32_t group = m.n_heads / m.n_kv_heads;
  switch (meth) {
    case method::kGpu: gpu_layer += sys.gpu.read_s(kv_bytes_layer); break;
    case method::kHost:
      gpu_layer += sys.gpu.read_s(kv_bytes_layer);
      kv_layer = (kv_bytes_layer + new_kv_layer) / (sys.host_link_gbps * sys.host_eff * 1e9);
      t.transfer_s = kv_layer * L;
      break;
    case method::kFlexgen: {
      // Each drive reads its share of the pages on its flash timeline while its link moves them;
      // the host link carries all drives' bytes. FlexGen reaches flexgen_eff of that path.
      gpu_layer += sys.gpu.read_s(kv_bytes_layer);
      const layer_flash fl = fc.get(sys.flash, batch, heads, m.head_dim, tpp, S, layer, nullptr, seal::kNone);
      const double drive_bytes = kv_bytes_layer * heads / m.n_kv_heads;
      const double drive_s =
          std::max(fl.read_ns * 1e-9, sys.link.transfer_ns(static_cast<uint64_t>(drive_bytes)) * 1e-9);
      const double host_s = (kv_bytes_layer + new_kv_layer) / (sys.host_link_gbps * 1e9);
      kv_layer = std::max(drive_s, host_s) / sys.flexgen_eff;
      t.transfer_s = kv_layer * L;
      t.flash_s = fl.read_ns * 1e-9 * L;
      break;
    }
    case method::kCsdDense:
    case method::kCsdSparf: {
      const bool sparse = meth == method::kCsdSparf;
      const sparf_fractions* spp = sparse ? &sp : nullptr;
      // Flash: programs of sealed chunks (every tpp steps) and column blocks (every 512 steps,
      // SparF) occupy their dies before the reads; amortised over the steps between seals.
      const layer_flash plain = fc.get(sys.flash, batch, heads, m.head_dim, tpp, S, layer, spp, seal::kNone);
      const layer_flash tok = fc.get(sys.flash, batch, heads, m.head_dim, tpp, S, layer, spp, seal::kTokenChunk);
      double read_ns = plain.read_ns + (tok.read_ns - plain.read_ns) / tpp;
      double program_ns = tok.program_ns / tpp;
      if (sparse) {
        const layer_flash col = fc.get(sys.flash, batch, heads, m.head_dim, tpp, S, layer, spp, seal::kColumnBlock);
        read_ns += (col.read_ns - plain.read_ns) / 512.0;
        program_ns += col.program_ns / 512.0;
      }
      // Compute: the work the drive's kernels do (models.hpp attend_work).
      csd::attend_work w;
      w.group = group;
      w.kv_dtype = m.elem_bytes == 4 ? dtype::kF32 : dtype::kF16;  // the paper model stores dense KV
      const double items = B * heads;
      if (!sparse) {
        w.kv_elements = items * 2.0 * static_cast<double>(S) * m.head_dim;
        w.scored_tokens = items * static_cast<double>(S);
      } else {
        const double k = sp.tokens * static_cast<double>(S);
        if (sp.approx) {
          w.approx_elements = items * static_cast<double>(S) * sp.channels * m.head_dim;
          w.ranked_tokens = items * static_cast<double>(S);
        }
        w.kv_elements = items * 2.0 * k * m.head_dim;
        w.scored_tokens = items * k;
      }
      // Link: the write command (K, V of this step) and the attend command (q in, output out).
      const uint64_t kv_in = static_cast<uint64_t>(B * 2.0 * heads * m.head_dim * m.elem_bytes);
      const uint64_t q_io = static_cast<uint64_t>(B * heads * group * m.head_dim * m.elem_bytes);
      const double write_ns =
          sys.link.command_ns(csd::link_bytes_in(static_cast<uint32_t>(kv_in)), sizeof(csd::cq_entry));
      csd::command_time attend;
      attend.link_ns = sys.link.command_ns(csd::link_bytes_in(static_cast<uint32_t>(q_io)), csd::link_bytes_out(q_io));
      attend.flash_ns = read_ns;
      attend.compute_ns = sys.compute.ns(w.flops());
      const double dev = (write_ns + attend.total_ns()) * 1e-9;
      kv_layer = dev;
      t.device_s = dev * L;
      t.link_s = (write_ns + attend.link_ns) * 1e-9 * L;
      t.flash_s = read_ns * 1e-9 * L;
      t.compute_s = attend.compute_ns * 1e-9 * L;
      t.program_s = program_ns / sys.flash.lanes() * 1e-9 * L;
      t.flash_pages = plain.pages * N * L;
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
