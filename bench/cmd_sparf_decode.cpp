// instinfer-bench sparf-decode: dense decode attention vs SparF vs the page-summary policy on the
// same cache, measured in the same run, on a storage backend (default ssd:) or any other (--kv host,
// --kv csd:; csd runs SparF only: the drive has no page summaries yet).
//
// The cache holds seeded structured inputs (testing/sparf_synthetic.hpp) for `batch` sequences
// of one layer; dense attend and attend_sparse alternate `reps` times (interleaved, so a noisy
// disk or a busy machine hits both alike). One JSON line per context, all measured here:
//   dense_ms, sparf_ms        median wall time of one layer's attend over the batch
//   speedup                   dense_ms / sparf_ms (the ratio to record: absolute times vary by machine)
//   bytes_frac                device bytes read by SparF / by dense (ssd: file bytes; csd: flash)
//   modelled_speedup          csd only: the drive's modelled time, dense / SparF
//   rel_err                   max relative difference of the SparF output from dense (a sanity bound)
//   pages_ms, pages_speedup, pages_bytes_frac, pages_rel_err: the same for the page policy
//   *_reads                   device read requests per call (ssd), dense / sparf / pages
//   host only (--kv host), the roofline of bench decode (bench_common.hpp), measured after the reps
//   with the cache's thread count: machine_read_gbps, fma_gflops, fma_per_byte (group / 2 for f16:
//   the SparF column pass, the top-k pass and dense all do `group` multiply-adds per 2-byte
//   element), roofline_gbps; dense_gbps / dense_roofline_ratio over K+V, and sparf_gbps /
//   sparf_roofline_ratio over the bytes SparF reads (sparf_bytes: "counted" by the backend, or
//   "budget": compression x K+V, on host, which counts none), bound; bf16_dot_gmacs / vnni_gmacs
//   sparf_copy_frac           SparF's column copy (host memory + column chunks on the device) / K+V
//   pages_summary_frac        the page summaries (host memory) / K+V
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "bench_common.hpp"
#include "instinfer/kv/kv_cache.hpp"
#include "instinfer/testing/sparf_synthetic.hpp"

namespace instinfer::bench {
namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

int run(int argc, char** argv) {
  flags f(argc, argv);
  const char* tmp = std::getenv("TMPDIR");
  const std::string default_kv = std::string("ssd:") + (tmp && *tmp ? tmp : "/tmp") + "/instinfer-sparf-decode.bin";
  const std::string kv = f.str("kv", default_kv);
  const std::vector<uint64_t> contexts = f.u64_list("ctx", {16384, 65536});
  const uint32_t batch = static_cast<uint32_t>(f.u64("batch", 1));
  const uint32_t kv_heads = static_cast<uint32_t>(f.u64("kv-heads", 8));
  const uint32_t group = static_cast<uint32_t>(f.u64("group", 1));
  const uint32_t d = static_cast<uint32_t>(f.u64("head-dim", 128));
  const uint32_t reps = static_cast<uint32_t>(f.u64("reps", 5));
  const uint32_t threads = static_cast<uint32_t>(f.u64("threads", 0));
  const double compression = f.f64("compression", 0.125);
  const uint32_t sinks = static_cast<uint32_t>(f.u64("sinks", 0));
  const uint32_t window = static_cast<uint32_t>(f.u64("window", 0));
  const bool run_pages = f.u64("pages", 1) != 0;
  const bool whole_pages = f.u64("whole-pages", sparf_params{}.whole_pages ? 1 : 0) != 0;
  const double page_spread = f.f64("page-spread", sparf_params{}.page_spread);
  const double channel_share = f.f64("channel-share", sparf_params::kDefaultChannelShare);
  const double reuse = f.f64("reuse", 0.0);
  if (f.has("help")) {
    std::printf(
        "instinfer-bench sparf-decode [--kv ssd:PATH|csd:|host] [--ctx 16384,65536] [--batch 1]\n"
        "  [--kv-heads 8] [--group 1] [--head-dim 128] [--reps 5] [--threads 0] [--compression 0.125]\n"
        "  [--sinks 0] [--window 0] [--pages 1] [--whole-pages 1] [--page-spread 2]\n"
        "  [--channel-share 0.5]\n"
        "  --pages 0: SparF only (csd: the drive keeps no page summaries)\n"
        "  --whole-pages 0: SparF's channels one by one, not whole column pages; --page-spread: its token pages\n"
        "  --reuse C: also time a decode step that reuses SparF's selection (reuse_min_cosine C, same\n"
        "  queries, so it is reused): sparf_reused_ms, reused_speedup\n");
    return 0;
  }
  if (!f.ok()) {
    std::fprintf(stderr, "sparf-decode: %s\n", f.error().c_str());
    return 2;
  }
  if (!f.finish()) return 2;
  if (batch == 0 || reps == 0) {
    std::fprintf(stderr, "sparf-decode: --batch and --reps must be >= 1\n");
    return 2;
  }
  sparf_params params = sparf_params::with_compression(compression);
  params.sink_tokens = sinks;
  params.window_tokens = window;
  params.whole_pages = whole_pages;
  params.page_spread = page_spread;
  params.channel_share = channel_share;
  if (auto v = params.validate(d); !v.ok()) {
    std::fprintf(stderr, "sparf-decode: %s\n", v.to_string().c_str());
    return 2;
  }
  sparf_params reuse_params = params;  // one reuse per fresh selection: every timed call reuses
  reuse_params.reuse_min_cosine = static_cast<float>(reuse);
  reuse_params.reuse_max_steps = 1;
  if (reuse > 0.0)
    if (auto v = reuse_params.validate(d); !v.ok()) {
      std::fprintf(stderr, "sparf-decode: %s\n", v.to_string().c_str());
      return 2;
    }
  sparf_params page_params = params;  // the same budget: fraction of page groups read
  page_params.policy = sparse_policy::kPageSummary;
  page_params.whole_pages = sparf_params{}.whole_pages;
  page_params.page_spread = sparf_params{}.page_spread;
  for (uint64_t ctx64 : contexts) {
    const uint32_t n = static_cast<uint32_t>(ctx64);
    cache_options o;
    o.shape = kv_shape{1, kv_heads * group, kv_heads, d, dtype::kF16};
    o.backend_uri = kv;
    o.n_threads = threads;
    o.sparf = true;
    o.page_summaries = run_pages;
    o.capacity_bytes = uint64_t{batch} * n * o.shape.token_bytes_per_layer() * 2 + (64ull << 20);
    auto created = kv_cache::create(o);
    if (!created.ok()) {
      std::fprintf(stderr, "sparf-decode: %s\n", created.error().to_string().c_str());
      return 1;
    }
    kv_cache& cache = *created.value();
    std::vector<seq_id> seqs;
    std::vector<float> q;
    for (uint32_t b = 0; b < batch; ++b) {
      synthetic::attention_workload_params wp;
      wp.n_tokens = n;
      wp.n_kv_heads = kv_heads;
      wp.group_size = group;
      wp.head_dim = d;
      wp.seed = 100 + b;
      const synthetic::attention_workload wl = synthetic::make_attention_workload(wp);
      seqs.push_back(cache.create_sequence().value());
      const size_t row = size_t{kv_heads} * d;
      for (uint32_t at = 0; at < n; at += 4096) {  // prefill in pieces
        const uint32_t m = std::min(4096u, n - at);
        const status s = cache.append(seqs.back(), 0, m, wl.k.data() + at * row, wl.v.data() + at * row, dtype::kF32);
        if (!s.ok()) {
          std::fprintf(stderr, "sparf-decode: %s\n", s.to_string().c_str());
          return 1;
        }
      }
      q.insert(q.end(), wl.q.begin(), wl.q.end());
    }
    if (const status s = cache.flush(); !s.ok()) {
      std::fprintf(stderr, "sparf-decode: %s\n", s.to_string().c_str());
      return 1;
    }
    std::vector<float> dense(q.size()), sparse(q.size()), paged(q.size());
    std::vector<double> t_dense, t_sparse, t_pages, t_reused;
    std::vector<float> reused(reuse > 0.0 ? q.size() : 0);
    uint64_t bytes_dense = 0, bytes_sparse = 0, bytes_pages = 0, reads_dense = 0, reads_sparse = 0, reads_pages = 0;
    double model_dense = 0.0, model_sparse = 0.0;
    for (uint32_t r = 0; r <= reps; ++r) {  // round 0 warms up (buffers, tails), not counted
      cache_stats s0 = cache.stats();
      double t0 = now_seconds();
      status st = cache.attend(0, seqs, q.data(), dense.data(), nullptr);
      const double t1 = now_seconds();
      cache_stats s1 = cache.stats();
      if (st.ok()) st = cache.attend_sparse(0, seqs, q.data(), sparse.data(), nullptr, params);
      const double t2 = now_seconds();
      cache_stats s2 = cache.stats();
      if (st.ok() && run_pages) st = cache.attend_sparse(0, seqs, q.data(), paged.data(), nullptr, page_params);
      const double t3 = now_seconds();
      cache_stats s3 = cache.stats();
      double t_reuse = 0.0;
      if (st.ok() && reuse > 0.0) {  // a fresh selection kept, then the timed call that reuses it
        st = cache.attend_sparse(0, seqs, q.data(), reused.data(), nullptr, reuse_params);
        const sparf_counters before = cache.stats().sparf;
        const double t4 = now_seconds();
        if (st.ok()) st = cache.attend_sparse(0, seqs, q.data(), reused.data(), nullptr, reuse_params);
        t_reuse = now_seconds() - t4;
        if (st.ok() && cache.stats().sparf.since(before).channels_used != 0)
          st = {errc::kInternal, "the timed reuse call selected afresh (a backend without reuse?)"};
      }
      if (!st.ok()) {
        std::fprintf(stderr, "sparf-decode: %s\n", st.to_string().c_str());
        return 1;
      }
      if (r == 0) continue;
      if (reuse > 0.0) t_reused.push_back(t_reuse);
      t_dense.push_back(t1 - t0);
      t_sparse.push_back(t2 - t1);
      t_pages.push_back(t3 - t2);
      bytes_dense += s1.backend.device_bytes_read - s0.backend.device_bytes_read;
      bytes_sparse += s2.backend.device_bytes_read - s1.backend.device_bytes_read;
      bytes_pages += s3.backend.device_bytes_read - s2.backend.device_bytes_read;
      reads_dense += s1.backend.device_read_requests - s0.backend.device_read_requests;
      reads_sparse += s2.backend.device_read_requests - s1.backend.device_read_requests;
      reads_pages += s3.backend.device_read_requests - s2.backend.device_read_requests;
      model_dense += s1.backend.modelled_device_seconds - s0.backend.modelled_device_seconds;
      model_sparse += s2.backend.modelled_device_seconds - s1.backend.modelled_device_seconds;
    }
    const auto rel_err = [&](const std::vector<float>& got) {
      double e = 0.0, m = 0.0;
      for (size_t i = 0; i < dense.size(); ++i) {
        e = std::max(e, std::fabs(double{got[i]} - dense[i]));
        m = std::max(m, std::fabs(double{dense[i]}));
      }
      return m > 0 ? e / m : e;
    };
    const double dm = median(t_dense), sm = median(t_sparse), pm = median(t_pages);
    // Storage beside K+V: SparF's column copy is its host part plus the column chunks stored on the
    // device (every chunk beyond the token chunks); the summaries are host memory only.
    const cache_stats fin = cache.stats();
    const uint64_t kv_bytes = uint64_t{batch} * n * o.shape.token_bytes_per_layer();
    const uint64_t token_chunks =
        uint64_t{batch} * ((n + cache.page().tokens_per_page - 1) / cache.page().tokens_per_page);
    const uint64_t column_chunks = fin.backend.used_chunks > token_chunks ? fin.backend.used_chunks - token_chunks : 0;
    const uint64_t sparf_copy = fin.sparf_column_bytes + column_chunks * fin.chunk_bytes;
    const auto frac = [](uint64_t a, uint64_t b) { return b ? static_cast<double>(a) / static_cast<double>(b) : 0.0; };
    json_line line;
    line.add("bench", "sparf-decode")
        .add("kind", "measured")
        .add("kv", kv)
        .add("ctx", n)
        .add("batch", batch)
        .add("kv_heads", kv_heads)
        .add("group", group)
        .add("head_dim", d)
        .add("compression", compression)
        .add("sinks", sinks)
        .add("whole_pages", whole_pages ? 1 : 0)
        .add("page_spread", page_spread)
        .add("channel_share", channel_share)
        .add("window", window)
        .add("threads", threads)
        .add("reps", reps)
        .add("dense_ms", dm * 1e3)
        .add("sparf_ms", sm * 1e3)
        .add("speedup", sm > 0 ? dm / sm : 0.0)
        .add("bytes_frac", frac(bytes_sparse, bytes_dense))
        .add("rel_err", rel_err(sparse))
        .add("dense_reads", reps ? reads_dense / reps : 0)
        .add("sparf_reads", reps ? reads_sparse / reps : 0)
        .add("sparf_copy_frac", frac(sparf_copy, kv_bytes));
    if (run_pages)
      line.add("pages_ms", pm * 1e3)
          .add("pages_speedup", pm > 0 ? dm / pm : 0.0)
          .add("pages_bytes_frac", frac(bytes_pages, bytes_dense))
          .add("pages_rel_err", rel_err(paged))
          .add("pages_reads", reps ? reads_pages / reps : 0)
          .add("pages_summary_frac", frac(fin.page_summary_bytes, kv_bytes));
    if (reuse > 0.0) {
      const double rm = median(t_reused);
      line.add("reuse_min_cosine", reuse)
          .add("sparf_reused_ms", rm * 1e3)
          .add("reused_speedup", rm > 0 ? dm / rm : 0.0)
          .add("reused_rel_err", rel_err(reused));
    }
    if (model_sparse > 0) line.add("modelled_speedup", model_dense / model_sparse);
    if (kv == "host") {
      const uint32_t n_thr = threads ? threads : std::max(1u, std::thread::hardware_concurrency());
      const cpu_isa isa = best_cpu_isa();
      const double read = measure_memory_read_gbps(kv_bytes, n_thr, isa);
      const double peak = measure_fma_gflops(n_thr, isa);
      const double fma_per_byte = static_cast<double>(group) * d / dtype_row_bytes(dtype::kF16, d);
      const double dense_gbps = dm > 0 ? static_cast<double>(kv_bytes) / dm / 1e9 : 0.0;
      const roofline dense_roof = roofline_of(read, peak, fma_per_byte, dense_gbps);
      line.add("machine_read_gbps", read)
          .add("fma_gflops", peak)
          .add("fma_per_byte", fma_per_byte)
          .add("roofline_gbps", dense_roof.gbps)
          .add("bound", dense_roof.compute_bound ? "compute" : "memory")
          .add("dense_gbps", dense_gbps)
          .add("dense_roofline_ratio", dense_roof.ratio);
      // SparF's bytes: as the backend counts them where it does; the host backend counts none, so
      // there they are its budget, `compression` x K+V (what the policy sizes r and k to read).
      const bool counted = bytes_dense > 0 && bytes_sparse > 0;
      const double sparf_frac = counted ? frac(bytes_sparse, bytes_dense) : compression;
      const double sparf_gbps = sm > 0 ? sparf_frac * static_cast<double>(kv_bytes) / sm / 1e9 : 0.0;
      line.add("sparf_bytes", counted ? "counted" : "budget")
          .add("sparf_gbps", sparf_gbps)
          .add("sparf_roofline_ratio", roofline_of(read, peak, fma_per_byte, sparf_gbps).ratio);
      add_reduced_peaks(line, measure_reduced_peaks(n_thr));
    }
    line.print();
    created.value().reset();
    if (kv.rfind("ssd:", 0) == 0) std::remove(kv.substr(4, kv.find('?') - 4).c_str());  // the bench's own file
  }
  return 0;
}

const command_registrar kRegister("sparf-decode", "dense decode vs SparF on one cache (ssd by default), interleaved",
                                  run);

}  // namespace
}  // namespace instinfer::bench
