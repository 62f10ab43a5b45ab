// instinfer-bench paper: the InstInfer paper's comparison, from the library's own models and kernels.
//
// Decode throughput (tokens/s) of an LLM (OPT-13B by default; --model llama-2-13b) for
//   gpu-resident KV, host-memory offload, FlexGen-style SSD offload, CSD dense, CSD SparF, and
//   1..N drives, over batch sizes and sequence lengths, plus sensitivity sweeps (internal and
//   link bandwidth, flash channels, context, batch, compression, drives).
// Every throughput is *modelled* (bench/paper_model.hpp: a stated GPU roofline; every flash, drive
// link and drive compute time from the drive's own model, include/instinfer/csd/models.hpp).
// The SparF page fractions feeding the CSD-SparF rows are *parameters*: the real SparF kernel
// (attention/sparf.hpp) runs on seeded synthetic inputs at each context, but its page budget
// (page_spread x the fewest pages holding k tokens) sets the token pages, so they equal the budget
// (0.125 at 1/8 with page_spread 2) at every context; they are not measured on a real model.
// Baselines come in two kinds that are never mixed in one table: "ideal" (FlexGen and host
// offload at their links' full rate) and "fitted" (their efficiencies fitted so the paper's
// CSD-dense ratios come out: a fit to the paper, not a measurement).
// Output: JSON lines on stdout (every line has "kind"), and with --csv PATH one CSV row per point
// for bench/plots/make_plots.sh.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "bench_common.hpp"
#include "instinfer/attention/sparf.hpp"
#include "instinfer/testing/sparf_synthetic.hpp"
#include "paper_model.hpp"

namespace instinfer::bench {
namespace {

using paper::method;

double parse_fraction(const std::string& s) {
  const size_t slash = s.find('/');
  if (slash == std::string::npos) return std::strtod(s.c_str(), nullptr);
  return std::strtod(s.substr(0, slash).c_str(), nullptr) / std::strtod(s.substr(slash + 1).c_str(), nullptr);
}

// Measures SparF's page and byte fractions with the real kernel, cached per (compression, context).
class sparf_meter {
 public:
  sparf_meter(const paper::model_shape& m, uint32_t page_bytes, uint32_t channels_per_page, uint32_t heads,
              uint64_t seed, double page_spread)
      : m_(m), page_bytes_(page_bytes), cpp_(channels_per_page), heads_(heads), seed_(seed), spread_(page_spread) {}

  result<paper::sparf_fractions> get(double compression, uint32_t n) {
    const auto key = std::make_pair(compression, n);
    if (auto it = cache_.find(key); it != cache_.end()) return it->second;
    auto g = page_geometry::make(page_bytes_, m_.head_dim, dtype::kF16);
    if (!g.ok()) return g.error();
    auto cfg = sparf_config::make(chunk_layout::make(g.value(), heads_), cpp_, 1);
    if (!cfg.ok()) return cfg.error();
    synthetic::attention_workload_params wp;
    wp.n_tokens = n;
    wp.n_kv_heads = heads_;
    wp.head_dim = m_.head_dim;
    wp.seed = seed_;
    const auto wl = synthetic::make_attention_workload(wp);
    const uint32_t H = heads_, d = m_.head_dim, tpp = g->tokens_per_page;
    std::vector<std::byte> kb(size_t{n} * H * d * 2), vb(kb.size());
    convert_elements(wl.k.data(), dtype::kF32, kb.data(), dtype::kF16, size_t{n} * H * d);
    convert_elements(wl.v.data(), dtype::kF32, vb.data(), dtype::kF16, size_t{n} * H * d);
    std::vector<std::vector<std::byte>> chunks((n + tpp - 1) / tpp, std::vector<std::byte>(cfg->tokens.chunk_bytes()));
    for (uint32_t tok = 0; tok < n; ++tok)
      for (uint32_t h = 0; h < H; ++h) {
        const size_t src = (size_t{tok} * H + h) * d * 2;
        std::copy_n(kb.data() + src, d * 2,
                    chunks[tok / tpp].data() + cfg->tokens.offset(kv_kind::kKey, h, tok % tpp, 0));
        std::copy_n(vb.data() + src, d * 2,
                    chunks[tok / tpp].data() + cfg->tokens.offset(kv_kind::kValue, h, tok % tpp, 0));
      }
    std::vector<const std::byte*> ptrs;
    for (const auto& c : chunks) ptrs.push_back(c.data());
    auto index = sparf_index::create(cfg->columns);
    if (!index.ok()) return index.error();
    INSTINFER_TRY(index->append(n, kb.data(), vb.data()));
    std::vector<float> out(size_t{H} * d);
    sparf_work w;
    w.chunks = ptrs.data();
    w.n_chunks = static_cast<uint32_t>(ptrs.size());
    w.n_tokens = n;
    w.column_blocks = index->block_pointers();
    w.n_column_blocks = index->n_blocks();
    w.v_mean = index->v_mean();
    w.q = wl.q.data();
    w.out = out.data();
    sparf_params p = sparf_params::with_compression(compression);
    p.page_spread = spread_;
    p.sink_tokens = p.window_tokens = 0;  // the paper's SparF: no dense ends
    sparf_counters c;
    INSTINFER_TRY(sparf_attend(cfg.value(), p, std::span<const sparf_work>(&w, 1), ws_, &c));
    paper::sparf_fractions f;
    f.token_pages = static_cast<double>(c.token_pages_read) / static_cast<double>(c.dense_pages);
    f.column_pages = static_cast<double>(c.channel_pages_read) / static_cast<double>(c.dense_pages);
    f.bytes = c.byte_fraction();
    f.approx = compression < 1.0;
    if (c.items > 0) {
      f.channels = static_cast<double>(c.channels_used) / static_cast<double>(c.items) / m_.head_dim;
      f.tokens = static_cast<double>(c.selected_tokens) / static_cast<double>(c.items) / n;
    }
    cache_[key] = f;
    json_line()
        .add("bench", "paper")
        .add("kind", "parameter")
        .add("what", "sparf-fractions")
        .add("source", "SparF kernel on synthetic inputs; token pages set by the page budget")
        .add("compression", compression)
        .add("tokens", n)
        .add("channels_per_page", cfg->columns.channels_per_page)
        .add("sample_heads", heads_)
        .add("token_page_frac", f.token_pages)
        .add("column_page_frac", f.column_pages)
        .add("page_frac", f.token_pages + f.column_pages)
        .add("byte_frac", f.bytes)
        .add("channel_frac", f.channels)
        .add("token_frac", f.tokens)
        .print();
    return f;
  }

 private:
  paper::model_shape m_;
  uint32_t page_bytes_, cpp_, heads_;
  uint64_t seed_;
  double spread_;
  sparf_workspace ws_;
  std::map<std::pair<double, uint32_t>, paper::sparf_fractions> cache_;
};

struct point {
  std::string sweep;
  uint32_t batch = 64;
  uint64_t input = 1024, output = 1024;
  double compression = 0.125;
  paper::system_model sys;
};

struct outcome {
  bool fits = false;
  double tokens_per_s = 0.0;
  paper::step_time avg{};  // per step, averaged over the generated tokens
  double page_frac = 0.0;
};

class harness {
 public:
  harness(paper::model_shape m, sparf_meter& meter, FILE* csv, uint64_t step_stride)
      : m_(std::move(m)), meter_(meter), csv_(csv), stride_(step_stride) {}
  const char* baseline = "ideal";  // "ideal" or "fitted": printed on every row

  // Decode of `output` tokens after an `input`-token prompt; throughput = batch * output / time.
  result<outcome> evaluate(method meth, const point& pt) {
    outcome o;
    o.fits = paper::fits(meth, m_, pt.sys, pt.batch, pt.input + pt.output);
    // SparF fractions measured at 5 contexts over the generation; each step uses the nearest.
    std::vector<std::pair<uint64_t, paper::sparf_fractions>> grid;
    if (meth == method::kCsdSparf) {
      for (int i = 0; i <= 4; ++i) {
        const uint64_t S = pt.input + pt.output * i / 4;
        auto f = meter_.get(pt.compression, static_cast<uint32_t>(S));
        if (!f.ok()) return f.error();
        grid.emplace_back(S, f.value());
      }
    }
    double total = 0.0, steps = 0.0, pages = 0.0;
    paper::step_time sum{};
    uint32_t sample = 0;
    for (uint64_t t = 0; t < pt.output; t += stride_, ++sample) {
      const uint64_t S = pt.input + t + 1;  // context including the token being decoded
      const uint64_t n_steps = std::min<uint64_t>(stride_, pt.output - t);
      paper::sparf_fractions f;
      if (!grid.empty()) {
        size_t best = 0;
        for (size_t i = 1; i < grid.size(); ++i)
          if (std::llabs(static_cast<long long>(grid[i].first) - static_cast<long long>(S)) <
              std::llabs(static_cast<long long>(grid[best].first) - static_cast<long long>(S)))
            best = i;
        f = grid[best].second;
        pages += (f.token_pages + f.column_pages) * static_cast<double>(n_steps);
      }
      // Samples walk over the layers: the drive places each (sequence, layer) differently.
      const paper::step_time st = paper::decode_step(meth, m_, pt.sys, pt.batch, S, f, flash_, sample % m_.n_layers);
      total += st.total_s * static_cast<double>(n_steps);
      steps += static_cast<double>(n_steps);
      sum.gpu_s += st.gpu_s * n_steps;
      sum.transfer_s += st.transfer_s * n_steps;
      sum.device_s += st.device_s * n_steps;
      sum.link_s += st.link_s * n_steps;
      sum.flash_s += st.flash_s * n_steps;
      sum.compute_s += st.compute_s * n_steps;
      sum.program_s += st.program_s * n_steps;
      sum.total_s += st.total_s * n_steps;
    }
    o.tokens_per_s =
        o.fits && total > 0.0 ? static_cast<double>(pt.batch) * static_cast<double>(pt.output) / total : 0.0;
    o.avg.gpu_s = sum.gpu_s / steps;
    o.avg.transfer_s = sum.transfer_s / steps;
    o.avg.device_s = sum.device_s / steps;
    o.avg.link_s = sum.link_s / steps;
    o.avg.flash_s = sum.flash_s / steps;
    o.avg.compute_s = sum.compute_s / steps;
    o.avg.program_s = sum.program_s / steps;
    o.avg.total_s = sum.total_s / steps;
    o.page_frac = grid.empty() ? (meth == method::kCsdDense ? 1.0 : 0.0) : pages / steps;
    return o;
  }

  // Evaluate and print one row; `flexgen` is the FlexGen-style throughput at the same point (1 drive).
  status emit(method meth, const point& pt, double flexgen_tps, double* tps_out = nullptr) {
    auto r = evaluate(meth, pt);
    if (!r.ok()) return r.error();
    const outcome& o = r.value();
    if (tps_out) *tps_out = o.tokens_per_s;
    const double speedup = flexgen_tps > 0.0 && o.fits ? o.tokens_per_s / flexgen_tps : 0.0;
    const auto& s = pt.sys;
    json_line()
        .add("bench", "paper")
        .add("kind", "modelled")
        .add("baseline", baseline)
        .add("sweep", pt.sweep)
        .add("model", m_.name)
        .add("method", paper::method_name(meth))
        .add("drives", s.drives)
        .add("batch", pt.batch)
        .add("input", pt.input)
        .add("output", pt.output)
        .add("internal_gbps", s.flash.internal_gbps())
        .add("channels", s.flash.channels)
        .add("link_gbps", s.link.gbps)
        .add("host_link_gbps", s.host_link_gbps)
        .add("compression", pt.compression)
        .add("fits", o.fits)
        .add("tokens_per_s", o.tokens_per_s)
        .add("step_ms", o.avg.total_s * 1e3)
        .add("gpu_ms", o.avg.gpu_s * 1e3)
        .add("transfer_ms", o.avg.transfer_s * 1e3)
        .add("device_ms", o.avg.device_s * 1e3)
        .add("link_ms", o.avg.link_s * 1e3)
        .add("flash_ms", o.avg.flash_s * 1e3)
        .add("compute_ms", o.avg.compute_s * 1e3)
        .add("program_ms_per_die", o.avg.program_s * 1e3)
        .add("page_frac", o.page_frac)
        .add("speedup_vs_flexgen", speedup)
        .print();
    if (csv_) {
      std::fprintf(
          csv_, "%s,%s,%s,%u,%u,%llu,%llu,%.6g,%u,%.6g,%.6g,%.6g,%d,%.6g,%.6g,%.6g,%.6g,%.6g,%.6g,%.6g,%.6g,modelled\n",
          pt.sweep.c_str(), m_.name.c_str(), paper::method_name(meth), s.drives, pt.batch,
          static_cast<unsigned long long>(pt.input), static_cast<unsigned long long>(pt.output),
          s.flash.internal_gbps(), s.flash.channels, s.link.gbps, s.host_link_gbps, pt.compression, o.fits ? 1 : 0,
          o.fits ? o.tokens_per_s : NAN, o.avg.total_s * 1e3, o.avg.gpu_s * 1e3, o.avg.transfer_s * 1e3,
          o.avg.device_s * 1e3, o.avg.link_s * 1e3, o.page_frac, speedup);
    }
    return {};
  }

  // All five methods at one point (1 drive); returns through *flexgen the baseline throughput.
  status emit_all(const point& pt, bool with_gpu = true) {
    point one = pt;
    one.sys.drives = 1;
    double fg = 0.0;
    auto base = evaluate(method::kFlexgen, one);
    if (!base.ok()) return base.error();
    fg = base->tokens_per_s;
    for (method m : {method::kGpu, method::kHost, method::kFlexgen, method::kCsdDense, method::kCsdSparf}) {
      if (m == method::kGpu && !with_gpu) continue;
      INSTINFER_TRY(emit(m, one, fg));
    }
    return {};
  }

  double flexgen(const point& pt) {
    point one = pt;
    one.sys.drives = 1;
    auto r = evaluate(method::kFlexgen, one);
    return r.ok() ? r->tokens_per_s : 0.0;
  }

 private:
  paper::model_shape m_;
  sparf_meter& meter_;
  FILE* csv_;
  uint64_t stride_;
  paper::flash_cache flash_;
};

int run(int argc, char** argv) {
  flags f(argc, argv);
  if (f.has("help")) {
    std::printf(
        "instinfer-bench paper [--model opt-13b|llama-2-13b] [--batch 1,2,4,...,128] [--input 1024] [--output 1024]\n"
        "  GPU:   [--gpu-mem-gbps 768] [--gpu-tflops 155] [--gpu-mem-gb 48] [--gpu-mem-eff 0.8] [--gpu-flop-eff 0.6]\n"
        "  links: [--host-link-gbps 32] [--link-gbps 7] [--host-mem-gb 256]\n"
        "  flash: [--channels 8] [--channel-gbps 1.4] [--dies 8] [--page-bytes 4096] [--read-us 20] [--program-us "
        "200]\n"
        "  CSD:   [--drives 1,2,4,8] [--compression 1/8] [--channels-per-page 0(auto)] [--page-spread 2]\n"
        "         [--model-cores 4] [--model-ghz 1.5] [--model-flops-per-cycle 8] [--model-eff 1]\n"
        "         [--overlap 1] [--flexgen-eff 1] [--host-eff 1]\n"
        "  headline: [--headline-compression 1/2,1/4] (the real model's supported range; docs/experiment.md)\n"
        "  out:   [--csv PATH] [--sweeps 1] [--sweep-batch 64] [--step-stride 64] [--sparf-heads 4] [--seed 1]\n");
    return 0;
  }
  const std::string model = f.str("model", "opt-13b");
  paper::model_shape m;
  if (model == "opt-13b") {
    m = paper::model_shape::opt_13b();
  } else if (model == "llama-2-13b" || model == "llama2-13b") {
    m = paper::model_shape::llama2_13b();
  } else {
    std::fprintf(stderr, "paper: unknown --model '%s' (opt-13b or llama-2-13b)\n", model.c_str());
    return 2;
  }
  const std::vector<uint64_t> batches = f.u64_list("batch", {1, 2, 4, 8, 16, 32, 64, 128});
  const std::vector<uint64_t> inputs = f.u64_list("input", {1024});
  const uint64_t output = f.u64("output", 1024);
  paper::system_model sys;
  sys.gpu.mem_gbps = f.f64("gpu-mem-gbps", 768.0);
  sys.gpu.tflops = f.f64("gpu-tflops", 155.0);
  sys.gpu.mem_gb = f.f64("gpu-mem-gb", 48.0);
  sys.gpu.mem_eff = f.f64("gpu-mem-eff", 0.8);
  sys.gpu.flop_eff = f.f64("gpu-flop-eff", 0.6);
  sys.host_link_gbps = f.f64("host-link-gbps", 32.0);
  sys.host_mem_gb = f.f64("host-mem-gb", 256.0);
  sys.link.gbps = f.f64("link-gbps", 7.0);
  sys.flash.channels = static_cast<uint32_t>(f.u64("channels", 8));
  sys.flash.channel_gbps = f.f64("channel-gbps", 1.4);
  sys.flash.dies_per_channel = static_cast<uint32_t>(f.u64("dies", 8));
  sys.flash.page_bytes = static_cast<uint32_t>(f.u64("page-bytes", 4096));
  sys.flash.read_us = f.f64("read-us", 20.0);
  sys.flash.program_us = f.f64("program-us", 200.0);
  sys.compute.cores = static_cast<uint32_t>(f.u64("model-cores", 4));
  sys.compute.ghz = f.f64("model-ghz", 1.5);
  sys.compute.flops_per_cycle = f.f64("model-flops-per-cycle", 8.0);
  sys.compute.efficiency = f.f64("model-eff", 1.0);
  sys.overlap = f.u64("overlap", 1) != 0;
  sys.flexgen_eff = f.f64("flexgen-eff", 1.0);
  sys.host_eff = f.f64("host-eff", 1.0);
  const std::vector<uint64_t> drives = f.u64_list("drives", {1, 2, 4, 8});
  const double compression = parse_fraction(f.str("compression", "1/8"));
  const uint32_t cpp = static_cast<uint32_t>(f.u64("channels-per-page", 0));
  const double spread = f.f64("page-spread", 2.0);
  const std::string csv_path = f.str("csv", "");
  const bool sweeps = f.u64("sweeps", 1) != 0;
  const uint32_t sweep_batch = static_cast<uint32_t>(f.u64("sweep-batch", 64));
  const uint64_t stride = std::max<uint64_t>(1, f.u64("step-stride", 64));
  std::vector<double> headline_c;
  {
    const std::string hl = f.str("headline-compression", "1/2,1/4");
    size_t at = 0;
    while (at <= hl.size()) {
      const size_t comma = std::min(hl.find(',', at), hl.size());
      if (comma > at) headline_c.push_back(parse_fraction(hl.substr(at, comma - at)));
      at = comma + 1;
    }
  }
  const uint32_t sparf_heads = static_cast<uint32_t>(f.u64("sparf-heads", 4));
  const uint64_t seed = f.u64("seed", 1);
  if (!f.ok()) {
    std::fprintf(stderr, "paper: %s\n", f.error().c_str());
    return 2;
  }
  if (!f.finish()) return 2;  // it names the unknown flag
  if (const status st = sys.flash.validate(); !st.ok()) {
    std::fprintf(stderr, "paper: %s\n", st.to_string().c_str());
    return 2;
  }
  if (const status st = sys.compute.validate(); !st.ok()) {
    std::fprintf(stderr, "paper: %s\n", st.to_string().c_str());
    return 2;
  }
  for (double c : headline_c)
    if (!(c > 0.0 && c <= 1.0)) {
      std::fprintf(stderr, "paper: --headline-compression values must be in (0, 1]\n");
      return 2;
    }
  if (const status st = sys.link.validate(); !st.ok()) {
    std::fprintf(stderr, "paper: %s\n", st.to_string().c_str());
    return 2;
  }
  if (!(compression > 0.0 && compression <= 1.0) || !(sys.host_link_gbps > 0.0) || !(sys.gpu.mem_gbps > 0.0) ||
      !(sys.gpu.tflops > 0.0) || !(sys.flexgen_eff > 0.0 && sys.flexgen_eff <= 1.0) ||
      !(sys.host_eff > 0.0 && sys.host_eff <= 1.0) || output == 0) {
    std::fprintf(
        stderr,
        "paper: compression, --flexgen-eff and --host-eff must be in (0, 1], bandwidths and rates > 0, output > 0\n");
    return 2;
  }
  std::unique_ptr<FILE, int (*)(FILE*)> csv(nullptr, &std::fclose);
  if (!csv_path.empty()) {
    csv.reset(std::fopen(csv_path.c_str(), "w"));
    if (!csv) {
      std::fprintf(stderr, "paper: cannot write %s\n", csv_path.c_str());
      return 1;
    }
    std::fprintf(csv.get(),
                 "sweep,model,method,drives,batch,input,output,internal_gbps,channels,link_gbps,host_link_gbps,"
                 "compression,fits,tokens_per_s,step_ms,gpu_ms,transfer_ms,device_ms,link_ms,page_frac,"
                 "speedup_vs_flexgen,kind\n");
  }
  json_line()
      .add("bench", "paper")
      .add("kind", "config")
      .add("model", m.name)
      .add("layers", m.n_layers)
      .add("heads", m.n_heads)
      .add("kv_heads", m.n_kv_heads)
      .add("head_dim", m.head_dim)
      .add("weight_gb", static_cast<double>(m.weight_bytes()) / 1e9)
      .add("kv_kb_per_token", static_cast<double>(m.kv_bytes_per_token()) / 1e3)
      .add("gpu", sys.gpu.name)
      .add("gpu_mem_gbps", sys.gpu.mem_gbps)
      .add("gpu_tflops", sys.gpu.tflops)
      .add("gpu_mem_gb", sys.gpu.mem_gb)
      .add("gpu_mem_eff", sys.gpu.mem_eff)
      .add("gpu_flop_eff", sys.gpu.flop_eff)
      .add("host_link_gbps", sys.host_link_gbps)
      .add("link_gbps", sys.link.gbps)
      .add("internal_gbps", sys.flash.internal_gbps())
      .add("flash_channels", sys.flash.channels)
      .add("dies_per_channel", sys.flash.dies_per_channel)
      .add("page_bytes", sys.flash.page_bytes)
      .add("read_us", sys.flash.read_us)
      .add("program_us", sys.flash.program_us)
      .add("erase_us", sys.flash.erase_us)
      .add("model_cores", sys.compute.cores)
      .add("model_ghz", sys.compute.ghz)
      .add("model_flops_per_cycle", sys.compute.flops_per_cycle)
      .add("model_eff", sys.compute.efficiency)
      .add("model_gflops", sys.compute.gflops())
      .add("overlap", sys.overlap)
      .add("flexgen_eff", sys.flexgen_eff)
      .add("host_eff", sys.host_eff)
      .add("compression", compression)
      .add("page_spread", spread)
      .print();

  sparf_meter meter(m, sys.flash.page_bytes, cpp, sparf_heads, seed, spread);
  harness h(m, meter, csv.get(), stride);
  // Rows outside the headline: "ideal" unless the efficiency flags were set ("given": user values).
  const char* const row_baseline = sys.flexgen_eff == 1.0 && sys.host_eff == 1.0 ? "ideal" : "given";
  h.baseline = row_baseline;
  auto fail = [](const status& st) {
    std::fprintf(stderr, "paper: %s\n", st.to_string().c_str());
    return 1;
  };

  // Main comparison: every method over batches and input lengths; drives for the storage methods.
  for (uint64_t in : inputs) {
    for (uint64_t b : batches) {
      point pt;
      pt.sweep = "main";
      pt.batch = static_cast<uint32_t>(b);
      pt.input = in;
      pt.output = output;
      pt.compression = compression;
      pt.sys = sys;
      if (const status st = h.emit_all(pt); !st.ok()) return fail(st);
      const double fg = h.flexgen(pt);
      for (uint64_t n : drives) {
        if (n <= 1) continue;
        point pn = pt;
        pn.sweep = "drives";
        pn.sys.drives = static_cast<uint32_t>(n);
        for (method mm : {method::kFlexgen, method::kCsdDense, method::kCsdSparf})
          if (const status st = h.emit(mm, pn, fg); !st.ok()) return fail(st);
      }
    }
  }

  // Headline: the paper's setting (batch 64 or --sweep-batch, first input length), at the
  // compressions the real model's accuracy supports (--headline-compression), in two tables that
  // are never mixed: ideal baselines, and baselines whose efficiencies are fitted to the paper.
  {
    point pt;
    pt.sweep = "headline";
    pt.batch = sweep_batch;
    pt.input = inputs.front();
    pt.output = output;
    pt.compression = compression;
    pt.sys = sys;
    const double paper_dense = m.name == "opt-13b" ? 6.85 : 5.68;
    const double paper_sparf = m.name == "opt-13b" ? 11.1 : 12.48;
    const double paper_host = 1.046;  // CSD dense / host offload (OPT-13B)
    auto tps = [&](method mm, const point& p) {
      auto r = h.evaluate(mm, p);
      return r.ok() && r->fits ? r->tokens_per_s : 0.0;
    };
    // Fit: the efficiency e in (0, 1] of a baseline that gives CSD dense / baseline = target
    // (bisection; the baseline's throughput grows with e). 1 when even the ideal one is slower.
    auto fit = [&](method base, double target, double paper::system_model::*eff) {
      point p = pt;
      const double dense = tps(method::kCsdDense, p);
      double lo = 1e-4, hi = 1.0;
      p.sys.*eff = hi;
      if (dense / tps(base, p) >= target) return 1.0;
      for (int i = 0; i < 50; ++i) {
        const double mid = 0.5 * (lo + hi);
        p.sys.*eff = mid;
        (dense / tps(base, p) > target ? lo : hi) = mid;
      }
      return 0.5 * (lo + hi);
    };
    const double fit_flexgen = fit(method::kFlexgen, paper_dense, &paper::system_model::flexgen_eff);
    const double fit_host = fit(method::kHost, paper_host, &paper::system_model::host_eff);
    for (const char* kind : {"ideal", "fitted"}) {
      const bool fitted = std::string_view(kind) == "fitted";
      point p = pt;
      if (fitted) p.sys.flexgen_eff = fit_flexgen, p.sys.host_eff = fit_host;
      h.baseline = kind;
      const double fg = h.flexgen(p), host = tps(method::kHost, p), dense = tps(method::kCsdDense, p);
      if (const status st = h.emit(method::kFlexgen, p, fg); !st.ok()) return fail(st);
      if (const status st = h.emit(method::kHost, p, fg); !st.ok()) return fail(st);
      if (const status st = h.emit(method::kCsdDense, p, fg); !st.ok()) return fail(st);
      for (double c : headline_c) {
        point q = p;
        q.compression = c;
        double sparse = 0.0;
        if (const status st = h.emit(method::kCsdSparf, q, fg, &sparse); !st.ok()) return fail(st);
        json_line()
            .add("bench", "paper")
            .add("kind", "modelled")
            .add("what", "headline")
            .add("baseline", kind)
            .add("model", m.name)
            .add("batch", p.batch)
            .add("input", p.input)
            .add("output", p.output)
            .add("compression", c)
            .add("flexgen_eff", p.sys.flexgen_eff)
            .add("host_eff", p.sys.host_eff)
            .add("flexgen_tokens_per_s", fg)
            .add("host_tokens_per_s", host)
            .add("csd_dense_tokens_per_s", dense)
            .add("csd_sparf_tokens_per_s", sparse)
            .add("csd_dense_over_flexgen", fg > 0 ? dense / fg : 0.0)
            .add("csd_sparf_over_flexgen", fg > 0 ? sparse / fg : 0.0)
            .add("csd_sparf_over_csd_dense", dense > 0 ? sparse / dense : 0.0)
            .add("csd_dense_over_host_offload", host > 0 ? dense / host : 0.0)
            .add("paper_csd_dense_over_flexgen", paper_dense)
            .add("paper_csd_sparf_over_flexgen", paper_sparf)
            .add("note", fitted ? "baseline efficiencies fitted to the paper's CSD-dense ratios, not measured"
                                : "baselines at their links' full rate")
            .print();
      }
    }
    h.baseline = row_baseline;
  }

  if (!sweeps) return 0;
  auto base = [&](const char* name) {
    point pt;
    pt.sweep = name;
    pt.batch = sweep_batch;
    pt.input = inputs.front();
    pt.output = output;
    pt.compression = compression;
    pt.sys = sys;
    return pt;
  };
  for (uint32_t ch : {2u, 4u, 8u, 16u, 32u}) {  // internal bandwidth via flash channels
    point pt = base("channels");
    pt.sys.flash.channels = ch;
    if (const status st = h.emit_all(pt, false); !st.ok()) return fail(st);
  }
  for (double gbps : {0.7, 1.4, 2.8, 4.0}) {  // internal bandwidth via channel speed
    point pt = base("internal");
    pt.sys.flash.channel_gbps = gbps;
    if (const status st = h.emit_all(pt, false); !st.ok()) return fail(st);
  }
  for (double gbps : {3.5, 7.0, 14.0, 28.0}) {  // drive link
    point pt = base("link");
    pt.sys.link.gbps = gbps;
    if (const status st = h.emit_all(pt, false); !st.ok()) return fail(st);
  }
  for (double gbps : {8.0, 16.0, 32.0, 64.0}) {  // host link
    point pt = base("host-link");
    pt.sys.host_link_gbps = gbps;
    if (const status st = h.emit_all(pt, false); !st.ok()) return fail(st);
  }
  for (uint64_t in : {512ull, 1024ull, 2048ull, 4096ull, 8192ull}) {  // context
    point pt = base("context");
    pt.input = in;
    if (const status st = h.emit_all(pt); !st.ok()) return fail(st);
  }
  for (double c : {1.0 / 2, 1.0 / 4, 1.0 / 8, 1.0 / 16}) {  // compression
    point pt = base("compression");
    pt.compression = c;
    const double fg = h.flexgen(pt);
    if (const status st = h.emit(method::kCsdSparf, pt, fg); !st.ok()) return fail(st);
  }
  for (uint32_t n : {1u, 2u, 4u, 8u, 16u, 20u}) {  // drives
    point pt = base("scale-out");
    pt.sys.drives = n;
    const double fg = h.flexgen(pt);
    for (method mm : {method::kFlexgen, method::kCsdDense, method::kCsdSparf})
      if (const status st = h.emit(mm, pt, fg); !st.ok()) return fail(st);
  }
  return 0;
}

const command_registrar kRegister("paper",
                                  "the paper's comparison: GPU / host / FlexGen-SSD / CSD dense / CSD SparF (modelled)",
                                  run);

}  // namespace
}  // namespace instinfer::bench
