// instinfer-bench sparf-accuracy: how close SparF is to dense attention, and what it reads.
//
// Inputs come from testing/sparf_synthetic.hpp (seeded; outlier channels, topic spans, sinks,
// a recent window; --structure random gives unstructured uniform data for contrast). Per
// (context, compression) and over seeds x query heads it reports, as JSON lines (all *measured*
// on this run's data, nothing modelled):
//   rel_err      |out_sparf - out_dense|_2 / |out_dense|_2 (dense: float64 over the stored values)
//   recall       |chosen tokens  n  true top-k tokens| / k (true: top-k exact logits of each head)
//   alpha        approximate softmax mass of the chosen tokens
//   page_frac    (token pages + column pages read) / token pages dense attention reads
//   byte_frac    bytes used (after the in-page filter) / dense K+V bytes
// With --csd (default: an emulated RAM-flash drive when the drive binary is found; --csd off to
// skip) the same stored values also go into a csd kv_cache, and the drive runs dense attend and
// SparF itself; from its own flash counters:
//   csd_flash_page_frac   flash pages SparF read / flash pages dense attend read (same data)
//   csd_vs_host_rel_max   max relative difference of the drive's SparF output from the host's
//   csd_storage_overhead  flash bytes programmed / K+V bytes written (the K copy: about 1.5)
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <string>
#include <string_view>
#include <vector>

#include "bench_common.hpp"
#include "instinfer/attention/sparf.hpp"
#include "instinfer/backend/csd_backend.hpp"
#include "instinfer/csd/protocol.hpp"
#include "instinfer/kv/kv_cache.hpp"
#include "instinfer/testing/sparf_synthetic.hpp"

namespace instinfer::bench {
namespace {

std::vector<double> parse_doubles(const std::string& s) {
  std::vector<double> out;
  size_t pos = 0;
  while (pos < s.size()) {
    const size_t comma = std::min(s.find(',', pos), s.size());
    const std::string tok = s.substr(pos, comma - pos);
    const size_t slash = tok.find('/');
    if (slash != std::string::npos)
      out.push_back(std::strtod(tok.substr(0, slash).c_str(), nullptr) /
                    std::strtod(tok.substr(slash + 1).c_str(), nullptr));
    else
      out.push_back(std::strtod(tok.c_str(), nullptr));
    pos = comma + 1;
  }
  return out;
}

struct stored {
  std::vector<std::vector<std::byte>> chunks;
  std::vector<const std::byte*> ptrs;
  sparf_index index;
  std::vector<float> k, v;  // stored values in f32
};

stored store(const sparf_config& cfg, const synthetic::attention_workload& wl, uint32_t n) {
  stored s;
  const uint32_t H = cfg.n_kv_heads(), d = cfg.head_dim(), tpp = cfg.tokens.page.tokens_per_page;
  const dtype t = cfg.tokens.page.kv_dtype;
  const uint32_t es = dtype_size(t);
  std::vector<std::byte> kb(size_t{n} * H * d * es), vb(kb.size());
  convert_elements(wl.k.data(), dtype::kF32, kb.data(), t, size_t{n} * H * d);
  convert_elements(wl.v.data(), dtype::kF32, vb.data(), t, size_t{n} * H * d);
  s.k.resize(size_t{n} * H * d);
  s.v.resize(s.k.size());
  convert_elements(kb.data(), t, s.k.data(), dtype::kF32, s.k.size());
  convert_elements(vb.data(), t, s.v.data(), dtype::kF32, s.v.size());
  s.chunks.assign((n + tpp - 1) / tpp, std::vector<std::byte>(cfg.tokens.chunk_bytes()));
  for (uint32_t tok = 0; tok < n; ++tok)
    for (uint32_t h = 0; h < H; ++h) {
      const size_t src = (size_t{tok} * H + h) * d * es;
      std::byte* c = s.chunks[tok / tpp].data();
      std::copy_n(kb.data() + src, d * es, c + cfg.tokens.offset(kv_kind::kKey, h, tok % tpp, 0));
      std::copy_n(vb.data() + src, d * es, c + cfg.tokens.offset(kv_kind::kValue, h, tok % tpp, 0));
    }
  for (const auto& c : s.chunks) s.ptrs.push_back(c.data());
  s.index = sparf_index::create(cfg.columns).value();
  (void)s.index.append(n, kb.data(), vb.data());
  return s;
}

int run(int argc, char** argv) {
  flags f(argc, argv);
  const std::vector<uint64_t> contexts = f.u64_list("tokens", {1024, 4096});
  const uint32_t d = static_cast<uint32_t>(f.u64("head-dim", 128));
  const uint32_t kv_heads = static_cast<uint32_t>(f.u64("kv-heads", 8));
  const uint32_t group = static_cast<uint32_t>(f.u64("group", 1));
  const uint32_t seeds = static_cast<uint32_t>(f.u64("seeds", 3));
  const uint32_t page_bytes = static_cast<uint32_t>(f.u64("page-bytes", 4096));
  const uint32_t cpp = static_cast<uint32_t>(f.u64("channels-per-page", 0));
  const std::string dtype_s = f.str("dtype", "f16");
  const std::vector<double> comps = parse_doubles(f.str("compression", "1,1/2,1/4,1/8,1/16"));
  const double spread = f.f64("page-spread", 2.0);
  const bool whole = f.u64("whole-pages", 1) != 0;
  const std::string structure = f.str("structure", "realistic");
  const double logit_std = f.f64("logit-std", 3.0);
  std::string csd_uri = f.str("csd", "auto");
  if (f.has("help")) {
    std::printf(
        "instinfer-bench sparf-accuracy [--tokens 1024,4096] [--head-dim 128] [--kv-heads 8] [--group 1]\n"
        "  [--seeds 3] [--page-bytes 4096] [--channels-per-page 0(auto)] [--dtype f16]\n"
        "  [--compression 1,1/2,1/4,1/8,1/16] [--page-spread 2] [--whole-pages 1]\n"
        "  [--structure realistic|random] [--logit-std 3] [--csd auto|off|URI]\n");
    return 0;
  }
  if (!f.ok()) {
    std::fprintf(stderr, "sparf-accuracy: %s\n", f.error().c_str());
    return 2;
  }
  if (!f.finish()) return 2;  // it names the unknown flag
  const auto t = parse_dtype(dtype_s);
  if (!t) {
    std::fprintf(stderr, "sparf-accuracy: unknown dtype '%s'\n", dtype_s.c_str());
    return 2;
  }
  auto g = page_geometry::make(page_bytes, d, *t);
  if (!g.ok()) {
    std::fprintf(stderr, "sparf-accuracy: %s\n", g.error().to_string().c_str());
    return 2;
  }
  auto cfg_r = sparf_config::make(chunk_layout::make(g.value(), kv_heads), cpp, group);
  if (!cfg_r.ok()) {
    std::fprintf(stderr, "sparf-accuracy: %s\n", cfg_r.error().to_string().c_str());
    return 2;
  }
  const sparf_config cfg = cfg_r.value();
  const uint32_t hq = cfg.n_q_heads();
  if (csd_uri == "auto") csd_uri = csd_backend::available() ? "csd:" : "off";
  sparf_workspace ws;
  for (uint64_t n64 : contexts) {
    const uint32_t n = static_cast<uint32_t>(n64);
    // One drive cache per seed, filled once, reused over the compressions.
    std::vector<std::unique_ptr<kv_cache>> drives(seeds + 1);
    for (double c : comps) {
      uint64_t drive_dense_pages = 0, drive_sparse_pages = 0, drive_programmed = 0, drive_appended = 0;
      double drive_vs_host = 0.0;
      sparf_params p = sparf_params::with_compression(c);
      p.page_spread = spread;
      p.whole_pages = whole;
      p.sink_tokens = p.window_tokens = 0;  // plain SparF: the accuracy of the selection itself
      auto plan = sparf_resolve(p, d, n);
      if (!plan.ok()) {
        std::fprintf(stderr, "sparf-accuracy: %s\n", plan.error().to_string().c_str());
        return 2;
      }
      double err_sum = 0.0, err_max = 0.0, recall_sum = 0.0, alpha_sum = 0.0, top_mass_sum = 0.0;
      uint64_t samples = 0;
      sparf_counters counters;
      for (uint32_t seed = 1; seed <= seeds; ++seed) {
        synthetic::attention_workload_params wp;
        wp.n_tokens = n;
        wp.n_kv_heads = kv_heads;
        wp.group_size = group;
        wp.head_dim = d;
        wp.seed = seed;
        wp.logit_std = static_cast<float>(logit_std);
        synthetic::attention_workload wl = synthetic::make_attention_workload(wp);
        if (structure == "random") {
          synthetic::rng r(seed * 7919);
          for (auto& x : wl.k) x = static_cast<float>(r.normal());
          for (auto& x : wl.v) x = static_cast<float>(r.normal());
          for (auto& x : wl.q) x = static_cast<float>(r.normal() * logit_std);  // logits ~ N(0, logit_std^2)
        }
        const stored s = store(cfg, wl, n);
        std::vector<float> out(size_t{hq} * d);
        std::vector<uint32_t> sel(size_t{kv_heads} * plan->k), nsel(kv_heads);
        sparf_work w;
        w.chunks = s.ptrs.data();
        w.n_chunks = static_cast<uint32_t>(s.ptrs.size());
        w.n_tokens = n;
        w.column_blocks = s.index.block_pointers();
        w.n_column_blocks = s.index.n_blocks();
        w.v_mean = s.index.v_mean();
        w.q = wl.q.data();
        w.out = out.data();
        w.selected = sel.data();
        w.n_selected = nsel.data();
        const status st = sparf_attend(cfg, p, std::span<const sparf_work>(&w, 1), ws, &counters);
        if (!st.ok()) {
          std::fprintf(stderr, "sparf-accuracy: %s\n", st.to_string().c_str());
          return 1;
        }
        if (csd_uri != "off") {  // the same values in the drive: dense vs SparF by its flash counters
          const seq_id seq = 1;
          if (!drives[seed]) {
            cache_options o;
            o.shape = kv_shape{1, hq, kv_heads, d, *t};
            o.page_bytes = page_bytes;
            o.backend_uri = csd_uri;
            o.sparf = true;
            o.sparf_channels_per_page = cfg.columns.channels_per_page;
            auto cache = kv_cache::create(o);
            status fill = cache.ok() ? status{} : cache.error();
            if (fill.ok()) {
              auto created = cache.value()->create_sequence();
              if (!created.ok())
                fill = created.error();
              else if (created.value() != seq)
                fill = {errc::kInternal, "unexpected sequence id"};
            }
            if (fill.ok()) fill = cache.value()->append(seq, 0, n, wl.k.data(), wl.v.data(), dtype::kF32);
            if (!fill.ok()) {
              std::fprintf(stderr, "sparf-accuracy: csd: %s\n", fill.to_string().c_str());
              return 1;
            }
            drives[seed] = std::move(cache).value();
          }
          kv_cache& dc = *drives[seed];
          auto& drive = dynamic_cast<csd_backend&>(dc.storage());
          std::vector<float> dout(size_t{hq} * d);
          csd::device_stats s0{}, s1{}, s2{};
          status ds = drive.drive_stats(0, s0);
          if (ds.ok()) ds = dc.attend(0, std::span<const seq_id>(&seq, 1), wl.q.data(), dout.data(), nullptr);
          if (ds.ok()) ds = drive.drive_stats(0, s1);
          if (ds.ok()) ds = dc.attend_sparse(0, std::span<const seq_id>(&seq, 1), wl.q.data(), dout.data(), nullptr, p);
          if (ds.ok()) ds = drive.drive_stats(0, s2);
          if (!ds.ok()) {
            std::fprintf(stderr, "sparf-accuracy: csd: %s\n", ds.to_string().c_str());
            return 1;
          }
          drive_programmed += s2.flash_pages_programmed * s2.page_bytes;  // everything stored so far
          drive_appended += s2.kv_bytes_appended;
          drive_dense_pages += s1.flash_pages_read - s0.flash_pages_read;
          drive_sparse_pages += s2.flash_pages_read - s1.flash_pages_read;
          double e = 0.0, m = 0.0;
          for (size_t i = 0; i < dout.size(); ++i) {
            e = std::max(e, std::fabs(double{dout[i]} - out[i]));
            m = std::max(m, std::fabs(double{out[i]}));
          }
          drive_vs_host = std::max(drive_vs_host, m > 0 ? e / m : e);
        }
        // Dense float64 reference and true top-k per query head.
        const double scale = cfg.effective_scale();
        std::vector<double> l(n);
        std::vector<uint32_t> idx(n);
        for (uint32_t qh = 0; qh < hq; ++qh) {
          const uint32_t h = qh / group;
          const float* q = wl.q.data() + size_t{qh} * d;
          double m = -INFINITY;
          for (uint32_t tok = 0; tok < n; ++tok) {
            double dot = 0.0;
            for (uint32_t i = 0; i < d; ++i) dot += double{q[i]} * s.k[(size_t{tok} * kv_heads + h) * d + i];
            l[tok] = dot * scale;
            m = std::max(m, l[tok]);
          }
          double den = 0.0;
          for (double x : l) den += std::exp(x - m);
          std::vector<double> ref(d, 0.0);
          for (uint32_t tok = 0; tok < n; ++tok) {
            const double pr = std::exp(l[tok] - m) / den;
            for (uint32_t i = 0; i < d; ++i) ref[i] += pr * s.v[(size_t{tok} * kv_heads + h) * d + i];
          }
          double num = 0.0, dn = 0.0;
          for (uint32_t i = 0; i < d; ++i) {
            const double e = out[size_t{qh} * d + i] - ref[i];
            num += e * e;
            dn += ref[i] * ref[i];
          }
          const double err = std::sqrt(num / std::max(dn, 1e-300));
          err_sum += err;
          err_max = std::max(err_max, err);
          std::iota(idx.begin(), idx.end(), 0u);
          const uint32_t k = plan->k;
          std::partial_sort(idx.begin(), idx.begin() + k, idx.end(),
                            [&](uint32_t a, uint32_t b) { return l[a] > l[b]; });
          std::vector<char> truth(n, 0);
          double top_mass = 0.0;
          for (uint32_t j = 0; j < k; ++j) {
            truth[idx[j]] = 1;
            top_mass += std::exp(l[idx[j]] - m) / den;
          }
          uint32_t hit = 0;
          double alpha = 0.0;
          for (uint32_t j = 0; j < nsel[h]; ++j) {
            const uint32_t tok = sel[size_t{h} * plan->k + j];
            hit += truth[tok];
            alpha += std::exp(l[tok] - m) / den;  // exact mass of the chosen tokens
          }
          recall_sum += static_cast<double>(hit) / k;
          alpha_sum += alpha;
          top_mass_sum += top_mass;
          ++samples;
        }
      }
      json_line line;
      line.add("bench", "sparf-accuracy")
          .add("kind", "measured")
          .add("structure", structure)
          .add("tokens", n)
          .add("head_dim", d)
          .add("kv_heads", kv_heads)
          .add("group", group)
          .add("dtype", dtype_name(*t))
          .add("page_bytes", page_bytes)
          .add("channels_per_page", cfg.columns.channels_per_page)
          .add("column_tokens_per_page", cfg.columns.tokens_per_page)
          .add("compression", c)
          .add("r", plan->r)
          .add("k", plan->k)
          .add("page_spread", spread)
          .add("whole_pages", whole)
          .add("seeds", seeds)
          .add("rel_err_mean", err_sum / samples)
          .add("rel_err_max", err_max)
          .add("recall_mean", recall_sum / samples)
          .add("chosen_exact_mass_mean", alpha_sum / samples)
          .add("true_topk_mass_mean", top_mass_sum / samples)
          .add("page_frac", counters.page_fraction())
          .add("token_page_frac", counters.dense_pages ? static_cast<double>(counters.token_pages_read) /
                                                             static_cast<double>(counters.dense_pages)
                                                       : 0.0)
          .add("byte_frac", counters.byte_fraction());
      if (csd_uri != "off") {
        line.add("csd_dense_flash_pages", drive_dense_pages)
            .add("csd_sparse_flash_pages", drive_sparse_pages)
            .add("csd_flash_page_frac",
                 drive_dense_pages ? static_cast<double>(drive_sparse_pages) / static_cast<double>(drive_dense_pages)
                                   : 0.0)
            .add("csd_vs_host_rel_max", drive_vs_host)
            // flash bytes programmed (token pages + column copy) / K+V bytes written: ~1.5 (the
            // paper's storage overhead), less while the last groups are still in DRAM
            .add("csd_storage_overhead",
                 drive_appended ? static_cast<double>(drive_programmed) / static_cast<double>(drive_appended) : 0.0);
      }
      line.print();
    }
  }
  return 0;
}

const command_registrar kRegister("sparf-accuracy",
                                  "SparF vs dense: relative error, top-k recall, pages read (synthetic inputs)", run);

}  // namespace
}  // namespace instinfer::bench
