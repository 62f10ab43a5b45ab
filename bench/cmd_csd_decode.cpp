// instinfer-bench csd-decode: decode through emulated computational storage drives, against a
// FlexGen-style SSD-offload baseline that reads all KV over the same modelled link.
//
// For every (ctx, batch, drives): a csd: cache (RAM-backed flash) is filled with `batch` random
// sequences of `ctx` tokens per layer, then `steps` decode steps run (per layer: append one token
// per sequence, attend the batch). Per decode step (all layers) it reports
//   link_bytes_host_to_dev / link_bytes_dev_to_host   counted on the link (q+k+v in, output out)
//   flash_pages_read                                   pages the drives read
//   modelled_seconds    model time (*modelled*, slowest drive per command; each command costs
//                       max(link, flash, compute), include/instinfer/csd/models.hpp)
//   modelled_{flash,link,compute,program}_seconds   the busiest drive's components (program: die
//                       time of page programs, which reads behind them wait for)
//   cpu_seconds         real CPU time of the drives' attention workers (*measured*, this machine)
// The baseline line (kind "ssd-offload") moves the same KV pages over the same link to the host:
// flash pages read = the same, link bytes out = all KV of the context, modelled time = the flash
// model reading those pages pipelined with the link transfer; cpu_seconds = the host backend's
// attention over the same tokens on this machine (measured).
// With --sparse B (a budget, e.g. 0.125) the cache also keeps SparF's column copy (f16 columns for
// a quantized dtype: channel_layout.hpp) and page summaries, and one more
// line (kind "csd-sparse") compares attend-only steps (no appends) of dense attention, SparF and
// the page-summary policy at that budget, default sinks and window: per step the drives' flash
// pages read and the modelled seconds.
#include <algorithm>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include <sys/resource.h>

#include "bench_common.hpp"
#include "instinfer/backend/csd_backend.hpp"
#include "instinfer/csd/models.hpp"
#include "instinfer/csd/protocol.hpp"
#include "instinfer/kv/kv_cache.hpp"

namespace instinfer::bench {
namespace {

double process_cpu_seconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec) * 1e-6;
}

std::vector<std::byte> random_rows(std::mt19937& rng, uint64_t n, const kv_shape& s) {
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> f(n * s.n_kv_heads * s.head_dim);
  for (auto& x : f) x = dist(rng);
  std::vector<std::byte> out(dtype_row_bytes(s.kv_dtype, f.size()));
  convert_elements(f.data(), dtype::kF32, out.data(), s.kv_dtype, f.size());
  return out;
}

uint64_t drive_cpu_ns(kv_cache& c) {
  auto& b = dynamic_cast<csd_backend&>(c.storage());
  uint64_t ns = 0;
  for (uint32_t d = 0; d < b.n_drives(); ++d) {
    csd::device_stats s{};
    if (b.drive_stats(d, s).ok()) ns += s.cpu_ns;
  }
  return ns;
}

// --sparse: `steps` attend-only steps (every layer, the whole batch) per policy; flash pages read
// and modelled seconds per step, from the drives' counters. A policy that fails ends the line.
json_line sparse_line(kv_cache& cache, const std::vector<seq_id>& seqs, std::vector<float>& q, std::vector<float>& out,
                      std::vector<float>& lse, uint32_t steps, double budget, bool with_sparf, bool& failed) {
  json_line j;
  j.add("bench", "csd-decode").add("kind", "csd-sparse").add("budget", budget);
  j.add("sinks", sparf_params::kDefaultSinkTokens).add("window", sparf_params::kDefaultWindowTokens);
  const uint32_t layers = cache.shape().n_layers;
  double dense_s = 0.0;
  uint64_t dense_pages = 0;
  for (int policy = -1; policy <= 1; ++policy) {  // -1: dense attend; 0: SparF; 1: page summaries
    if (policy == 0 && !with_sparf) continue;
    sparf_params p = sparf_params::with_compression(budget);
    p.policy = policy == 1 ? sparse_policy::kPageSummary : sparse_policy::kSparf;
    const backend_stats s0 = cache.stats().backend;
    for (uint32_t step = 0; step < steps; ++step)
      for (uint32_t l = 0; l < layers; ++l) {
        const status s = policy < 0 ? cache.attend(l, seqs, q.data(), out.data(), lse.data())
                                    : cache.attend_sparse(l, seqs, q.data(), out.data(), lse.data(), p);
        if (!s.ok()) {
          std::fprintf(stderr, "csd-decode: --sparse: %s\n", s.to_string().c_str());
          failed = true;
          return j;
        }
      }
    const backend_stats s1 = cache.stats().backend;
    const double secs = (s1.modelled_device_seconds - s0.modelled_device_seconds) / steps;
    const uint64_t pages = (s1.flash_pages_read - s0.flash_pages_read) / steps;
    const char* name = policy < 0 ? "dense" : policy == 0 ? "sparf" : "pages";
    j.add(std::string(name) + "_flash_pages_read", pages).add(std::string(name) + "_modelled_seconds", secs);
    if (policy < 0) {
      dense_s = secs;
      dense_pages = pages;
    } else {
      j.add(std::string(name) + "_page_fraction", dense_pages ? double(pages) / double(dense_pages) : 0.0);
      j.add(std::string(name) + "_modelled_speedup", secs > 0 ? dense_s / secs : 0.0);
    }
  }
  return j;
}

int run(int argc, char** argv) {
  flags f(argc, argv);
  const auto ctxs = f.u64_list("ctx", {1024, 4096});
  const auto batches = f.u64_list("batch", {1, 4});
  const auto drive_counts = f.u64_list("drives", {1, 2});
  kv_shape shape;
  shape.n_layers = static_cast<uint32_t>(f.u64("layers", 1));
  shape.n_kv_heads = static_cast<uint32_t>(f.u64("kv-heads", 8));
  shape.n_q_heads = static_cast<uint32_t>(f.u64("q-heads", 8));
  shape.head_dim = static_cast<uint32_t>(f.u64("head-dim", 128));
  const auto dt = parse_dtype(f.str("dtype", "f16"));
  const uint32_t steps = static_cast<uint32_t>(f.u64("steps", 4));
  const uint32_t page = static_cast<uint32_t>(f.u64("page", 4096));
  const uint64_t cores = f.u64("cores", 4);
  csd::flash_params fp;
  fp.channels = static_cast<uint32_t>(f.u64("channels", fp.channels));
  fp.channel_gbps = f.f64("channel-gbps", fp.channel_gbps);
  fp.page_bytes = page;
  csd::link_params lp;
  lp.gbps = f.f64("link-gbps", lp.gbps);
  lp.command_us = f.f64("link-us", lp.command_us);
  const bool baseline_cpu = !f.has("no-host");
  const double sparse_budget = f.f64("sparse", 0.0);
  if (!f.finish() || !f.ok()) {
    std::fprintf(stderr,
                 "usage: instinfer-bench csd-decode [--ctx 1024,4096] [--batch 1,4] [--drives 1,2] [--layers 1]\n"
                 "  [--kv-heads 8] [--q-heads 8] [--head-dim 128] [--dtype f16] [--steps 4] [--page 4096]\n"
                 "  [--cores 4] [--channels 8] [--channel-gbps 1.4] [--link-gbps 7] [--link-us 2] [--no-host]\n"
                 "  [--sparse 0 (a budget in (0, 1]: also SparF and page summaries, attend-only)]\n%s\n",
                 f.error().c_str());
    return 2;
  }
  if (!dt) {
    std::fprintf(stderr, "csd-decode: unknown dtype\n");
    return 2;
  }
  if (!(sparse_budget == 0.0 || (sparse_budget > 0.0 && sparse_budget <= 1.0))) {
    std::fprintf(stderr, "csd-decode: --sparse must be 0 (off) or in (0, 1]\n");
    return 2;
  }
  shape.kv_dtype = *dt;
  if (auto s = shape.validate(); !s.ok()) {
    std::fprintf(stderr, "csd-decode: %s\n", s.to_string().c_str());
    return 2;
  }
  if (!csd_backend::available()) {
    std::fprintf(stderr, "csd-decode: instinfer-csd not found next to instinfer-bench (or INSTINFER_CSD_DEVICE)\n");
    return 77;
  }
  std::mt19937 rng(42);
  for (uint64_t ctx : ctxs)
    for (uint64_t batch : batches)
      for (uint64_t drives : drive_counts) {
        cache_options o;
        o.shape = shape;
        o.page_bytes = page;
        const bool with_sparf = sparse_budget > 0.0;
        o.sparf = with_sparf;
        o.page_summaries = sparse_budget > 0.0;
        const uint64_t chunk_bytes = 2ull * shape.n_kv_heads * page;
        const uint64_t tpp = page / shape.row_bytes();
        const uint64_t chunks = batch * shape.n_layers * ((ctx + steps + tpp - 1) / tpp + 1);
        o.capacity_bytes = chunks * chunk_bytes;
        // Flash sized to the KV (plus room, and SparF's column copy: column pages per K page, 1 for
        // f16 / bf16, about 2 for q8_0 and 4 for q4_0), so RAM flash stays proportional.
        const uint64_t lanes = uint64_t{fp.channels} * 8;
        const uint64_t column_pages = (2ull * shape.head_dim + shape.row_bytes() - 1) / shape.row_bytes();
        const uint64_t flash_pages_needed =
            chunks * (with_sparf ? 2 + column_pages : 2) * shape.n_kv_heads / drives * 2 + lanes * 256 * 2;
        const uint64_t blocks_per_die = std::max<uint64_t>(2, flash_pages_needed / (lanes * 256) + 1);
        o.backend_uri = "csd:?drives=" + std::to_string(drives) + "&cores=" + std::to_string(cores) +
                        "&channels=" + std::to_string(fp.channels) +
                        "&channel_gbps=" + std::to_string(fp.channel_gbps) + "&link_gbps=" + std::to_string(lp.gbps) +
                        "&link_us=" + std::to_string(lp.command_us) + "&page=" + std::to_string(page) +
                        "&blocks_per_die=" + std::to_string(blocks_per_die) + "&data_mb=64&timeout_ms=60000";
        auto c = kv_cache::create(o);
        if (!c.ok()) {
          std::fprintf(stderr, "csd-decode: %s\n", c.error().to_string().c_str());
          return 1;
        }
        kv_cache& cache = *c.value();
        std::unique_ptr<kv_cache> host;
        if (baseline_cpu) {
          cache_options ho = o;
          ho.backend_uri = "host:?hugepages=0";
          auto h = kv_cache::create(ho);
          if (!h.ok()) {
            std::fprintf(stderr, "csd-decode: %s\n", h.error().to_string().c_str());
            return 1;
          }
          host = std::move(h).value();
        }
        std::vector<seq_id> seqs, hseqs;
        for (uint64_t b = 0; b < batch; ++b) {
          seqs.push_back(cache.create_sequence().value());
          if (host) hseqs.push_back(host->create_sequence().value());
          for (uint32_t l = 0; l < shape.n_layers; ++l) {
            const auto k = random_rows(rng, ctx, shape);
            const auto v = random_rows(rng, ctx, shape);
            status s = cache.append(seqs.back(), l, static_cast<uint32_t>(ctx), k.data(), v.data(), shape.kv_dtype);
            if (s.ok() && host)
              s = host->append(hseqs.back(), l, static_cast<uint32_t>(ctx), k.data(), v.data(), shape.kv_dtype);
            if (!s.ok()) {
              std::fprintf(stderr, "csd-decode: prefill: %s\n", s.to_string().c_str());
              return 1;
            }
          }
        }
        const uint64_t qn = batch * uint64_t{shape.n_q_heads} * shape.head_dim;
        std::vector<float> q(qn), out(qn), lse(batch * shape.n_q_heads);
        std::normal_distribution<float> dist(0.0f, 1.0f);
        for (auto& x : q) x = dist(rng);
        // One warm-up step syncs the drives' page tables; then measure.
        for (uint32_t l = 0; l < shape.n_layers; ++l)
          if (auto s = cache.attend(l, seqs, q.data(), out.data(), lse.data()); !s.ok()) {
            std::fprintf(stderr, "csd-decode: attend: %s\n", s.to_string().c_str());
            return 1;
          }
        const backend_stats s0 = cache.stats().backend;
        const uint64_t cpu0 = drive_cpu_ns(cache);
        const double wall0 = now_seconds();
        double host_cpu = 0.0;
        for (uint32_t step = 0; step < steps; ++step)
          for (uint32_t l = 0; l < shape.n_layers; ++l) {
            for (size_t b = 0; b < seqs.size(); ++b) {
              const auto k = random_rows(rng, 1, shape);
              const auto v = random_rows(rng, 1, shape);
              status s = cache.append(seqs[b], l, 1, k.data(), v.data(), shape.kv_dtype);
              if (s.ok() && host) s = host->append(hseqs[b], l, 1, k.data(), v.data(), shape.kv_dtype);
              if (!s.ok()) {
                std::fprintf(stderr, "csd-decode: append: %s\n", s.to_string().c_str());
                return 1;
              }
            }
            if (auto s = cache.attend(l, seqs, q.data(), out.data(), lse.data()); !s.ok()) {
              std::fprintf(stderr, "csd-decode: attend: %s\n", s.to_string().c_str());
              return 1;
            }
            if (host) {
              const double c0 = process_cpu_seconds();
              (void)host->attend(l, hseqs, q.data(), out.data(), lse.data());
              host_cpu += process_cpu_seconds() - c0;
            }
          }
        const double wall = now_seconds() - wall0;
        const backend_stats s1 = cache.stats().backend;
        const double per = 1.0 / steps;
        const double modelled = (s1.modelled_device_seconds - s0.modelled_device_seconds) * per;
        const uint64_t pages = (s1.flash_pages_read - s0.flash_pages_read) / steps;
        const double cpu = static_cast<double>(drive_cpu_ns(cache) - cpu0) * 1e-9 * per;
        // Baseline: every KV page of the step crosses the link (FlexGen-style SSD offload). The
        // flash reads stripe over all lanes of one drive, pipelined with the link transfer.
        const uint64_t tokens = ctx + steps / 2;  // mean context over the measured steps
        const uint64_t kv_bytes = batch * shape.n_layers * tokens * shape.token_bytes_per_layer();
        const uint64_t base_pages = batch * shape.n_layers * ((tokens + tpp - 1) / tpp) * 2 * shape.n_kv_heads;
        csd::flash_params bfp = fp;
        bfp.blocks_per_die = static_cast<uint32_t>(
            std::max<uint64_t>(1, base_pages / (uint64_t{bfp.lanes()} * bfp.pages_per_block) + 1));
        csd::flash_timeline tl(bfp);
        std::vector<uint32_t> ppns(base_pages);
        const uint64_t per_lane = uint64_t{bfp.blocks_per_die} * bfp.pages_per_block;
        for (uint64_t i = 0; i < base_pages; ++i)
          ppns[i] = static_cast<uint32_t>((i % bfp.lanes()) * per_lane + i / bfp.lanes());
        const double flash_ns = tl.read_batch(ppns.data(), ppns.size(), 0.0);
        const uint64_t base_in =
            batch * shape.n_layers * shape.token_bytes_per_layer() + shape.n_layers * 2 * sizeof(csd::sq_entry);
        const uint64_t base_out = kv_bytes + shape.n_layers * 2 * sizeof(csd::cq_entry);
        const double base_link_ns = lp.command_ns(base_in, base_out) + shape.n_layers * lp.command_us * 1e3;
        const double base_modelled = std::max(flash_ns, base_link_ns) * 1e-9;
        json_line()
            .add("bench", "csd-decode")
            .add("kind", "csd")
            .add("ctx", ctx)
            .add("batch", batch)
            .add("drives", drives)
            .add("layers", shape.n_layers)
            .add("kv_heads", shape.n_kv_heads)
            .add("q_heads", shape.n_q_heads)
            .add("head_dim", shape.head_dim)
            .add("dtype", dtype_name(shape.kv_dtype))
            .add("page", page)
            .add("link_bytes_host_to_dev", (s1.link_bytes_host_to_device - s0.link_bytes_host_to_device) / steps)
            .add("link_bytes_dev_to_host", (s1.link_bytes_device_to_host - s0.link_bytes_device_to_host) / steps)
            .add("flash_pages_read", pages)
            .add("modelled_seconds", modelled)
            .add("modelled_flash_seconds", (s1.modelled_flash_seconds - s0.modelled_flash_seconds) * per)
            .add("modelled_link_seconds", (s1.modelled_link_seconds - s0.modelled_link_seconds) * per)
            .add("modelled_compute_seconds", (s1.modelled_compute_seconds - s0.modelled_compute_seconds) * per)
            .add("modelled_program_seconds", (s1.modelled_program_seconds - s0.modelled_program_seconds) * per)
            .add("cpu_seconds", cpu)
            .add("wall_seconds", wall * per)
            .add("modelled_speedup_vs_ssd_offload", modelled > 0 ? base_modelled / modelled : 0.0)
            .add("write_amplification", s1.write_amplification())
            .print();
        json_line()
            .add("bench", "csd-decode")
            .add("kind", "ssd-offload")
            .add("ctx", ctx)
            .add("batch", batch)
            .add("drives", uint64_t{1})
            .add("layers", shape.n_layers)
            .add("link_bytes_host_to_dev", base_in)
            .add("link_bytes_dev_to_host", base_out)
            .add("flash_pages_read", base_pages)
            .add("modelled_seconds", base_modelled)
            .add("modelled_flash_seconds", flash_ns * 1e-9)
            .add("modelled_link_seconds", base_link_ns * 1e-9)
            .add("cpu_seconds", host ? host_cpu * per : 0.0)
            .print();
        if (sparse_budget > 0.0) {
          bool failed = false;
          json_line j = sparse_line(cache, seqs, q, out, lse, steps, sparse_budget, with_sparf, failed);
          if (failed) return 1;
          j.add("ctx", ctx).add("batch", batch).add("drives", drives).add("dtype", dtype_name(shape.kv_dtype)).print();
        }
        std::fflush(stdout);
      }
  return 0;
}

const command_registrar kRegister("csd-decode",
                                  "decode in emulated CSDs vs FlexGen-style SSD offload (link bytes, flash pages, "
                                  "modelled and CPU time)",
                                  run);

}  // namespace
}  // namespace instinfer::bench
