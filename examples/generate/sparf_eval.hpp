// SparF on attention captured from the real model: the evaluation shared by instinfer-sparf-model
// (sparf_model.cpp) and tests/model/test_sparf_model.cpp.
//
// A captured call is what the model's attention observer sees right before kv_cache::attend: the
// post-RoPE queries of one decode token, with the stored K/V of its (sequence, layer) read back
// (kv_cache::read_tokens, already holding the token itself). The rows are laid out again in
// token-indexed chunks and a sparf_index (the channel-indexed copy), and SparF runs through its
// public API with dual-step loading: sparf_select, then sparf_attend with only the chunks that
// hold a selected token. The metrics are those of `instinfer-bench sparf-accuracy`
// (bench/cmd_sparf_accuracy.cpp), so both reports mean the same thing:
//   rel_err      |out_sparf - out_dense|_2 / |out_dense|_2 per query head (dense: float64 over the
//                stored values)
//   recall       |chosen tokens of the head's group  n  the head's true top-k by exact logits| / k
//   chosen_mass  exact softmax mass of the chosen tokens; topk_mass: that of the true top-k
//   page_frac    sparf_counters::page_fraction (token + column pages read / dense token pages)
//   byte_frac    sparf_counters::byte_fraction (bytes used after the in-page filter / dense bytes)
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "instinfer/attention/sparf.hpp"
#include "instinfer/kv/kv_cache.hpp"

namespace instinfer::model::sparf_eval {

// The long prompt: about 1.4K tokens of English written for this experiment (a lighthouse's
// history, with names, dates and numbers) and an instruction after it whose answer draws on the
// whole context. (SmolLM2-135M summarises it; asked a factual question it tends to copy the text
// from its start instead, another long-range lookup.)
inline constexpr std::string_view kLongText =
    R"TEXT(The lighthouse at Harrow Point stands on a ridge of dark basalt at the northern end of Mallow Bay. It was built in 1846 by the engineer Eliza Thornbury, who had spent six years arguing with the harbour board that the reef below the point had sunk more ships than any storm. Her first design was a wooden tower, but the board refused to pay for timber that would rot in the salt wind, so she drew a second design in granite, quarried forty miles inland and carried to the coast on flat barges along the Wend river. The tower is thirty-one metres tall, painted white with a single red band below the gallery, and its light can be seen from twenty-two nautical miles on a clear night.

The first keeper was Samuel Okafor, a former ship's carpenter who had lost two fingers on his left hand in a rigging accident. He kept the light for twenty-seven years and wrote in the logbook every evening at nine o'clock, whatever the weather. His entries are short and precise: the wind direction, the state of the sea, the number of ships that passed, and the amount of oil burned. On the night of the great storm of 1859 he wrote only one line: "Wind north-east, very heavy, lamp lit at 4:40, no ships seen, God keep them." The next morning he found the wreck of the schooner Marigold on the reef and rowed out alone to bring back three survivors, a feat that earned him a silver medal from the harbour board.

Okafor's daughter, Ruth, grew up in the keeper's cottage beside the tower. She learned to trim the wick and polish the great lens before she could read, and by the age of fourteen she could take the night watch on her own. When her father's eyesight began to fail in 1871, Ruth quietly took over most of the work, although the board did not officially appoint her as keeper until 1873, after a petition signed by one hundred and twelve fishermen of Mallow Bay. She was one of the first women to hold such a post on that coast, and she kept the light for another thirty-four years.

The lens itself has its own history. It is a first-order Fresnel lens, made in Paris by the workshop of Henri Lepaute and shipped in eleven crates in the spring of 1852. Before it arrived, the tower used a ring of twelve oil lamps with polished copper reflectors, which burned almost four times as much oil for a weaker beam. The Fresnel lens weighs nearly three tonnes and floats on a bath of mercury, so that a clockwork mechanism, wound by hand every four hours, can turn it smoothly. The rotation gives the light its signature: two white flashes every fifteen seconds. Sailors who knew the coast called it "the double wink of Harrow".

In 1901 the oil lamp was replaced by a paraffin vapour burner, which gave a brighter and steadier flame. In 1934 the light was electrified, and a diesel generator was installed in a small brick shed behind the cottage. The clockwork was kept as a backup until 1968, when an electric motor took its place. The last resident keeper, Thomas Vane, left the point in 1989, when the light was fully automated and began to be monitored by radio from the harbour office in Port Ellery, fifteen miles to the south.

Today the cottage is a small museum run by volunteers. Its most prized object is Samuel Okafor's logbook, bound in green leather, with the entry for the storm of 1859 still legible under a sheet of glass. Visitors can also see the silver medal, a model of the schooner Marigold made by one of its survivors, and a photograph of Ruth Okafor standing in the lantern room with a polishing cloth in her hand. The museum opens every day from May to September, and on the second Sunday of August the volunteers light a replica of the old oil lamp in memory of the keepers.

The reef below the point is still dangerous. Its rocks lie less than a metre below the surface at low tide, and the currents around it change direction with the tide, pulling small boats sideways toward the rocks. Local fishermen say that the safest passage is to keep the lighthouse on the left bow until the church spire of Mallow village lines up with the tower, then turn hard to the south-west. Since the lens was installed in 1852, only four ships have been lost on the reef, compared with at least nineteen in the thirty years before the tower was built.

Eliza Thornbury went on to design seven more lighthouses along the northern coast, but she always said that Harrow Point was the one she was proudest of. In a letter to her sister in 1850 she wrote that the tower was "not beautiful, but honest: it does exactly what it promises, and it will still be standing when all of us are forgotten". She died in 1888 and is buried in the churchyard of Mallow village, within sight of the light.

The harbour board's records show that the total cost of the tower, the cottage and the first lamps was 8,400 pounds, of which almost half went on carrying the granite from the quarry. The Fresnel lens cost another 1,150 pounds and was paid for by a public subscription organised by the shipowners of Port Ellery after the loss of the Marigold. The clockwork mechanism was made by a local clockmaker, Jonas Pell, who also repaired it for more than twenty years and refused to accept any payment for his work.

Not everyone in Mallow Bay welcomed the tower at first. Some of the older families had made a living from salvage, collecting timber, rope and cargo from the ships that broke up on the reef, and they saw the light as a threat to their trade. In the winter of 1847 someone cut the rope of the supply boat and let it drift out to sea, and for two weeks the keeper had to carry oil up the cliff path on his back. The culprit was never found. Within a generation, however, the salvage trade had disappeared, and the same families were sending their sons to sea as fishermen and sailors, trusting the double wink of Harrow to bring them home.)TEXT";
inline constexpr std::string_view kInstruction = "Summarize the text in two sentences.";
// The user message (the chat template wraps it): the text, then the instruction.
inline std::string user_message(std::string_view text = kLongText) {
  return std::string(text) + "\n\n" + std::string(kInstruction);
}

// The stored K/V of one (sequence, layer) and the queries of one decode token.
struct captured_attention {
  uint32_t layer = 0;
  uint32_t n_tokens = 0;
  std::vector<std::byte> k, v;  // [n_tokens][n_kv_heads][head_dim], cache dtype
  std::vector<float> q;         // [n_q_heads][head_dim]
};

inline result<captured_attention> capture(kv_cache& cache, seq_id seq, uint32_t layer, const float* q) {
  captured_attention c;
  c.layer = layer;
  INSTINFER_TRY(cache.read_tokens(seq, layer, c.k, c.v));
  const kv_shape& s = cache.shape();
  const size_t row = size_t{s.n_kv_heads} * s.row_bytes();
  if (row == 0 || c.k.size() % row != 0 || c.v.size() != c.k.size())
    return status{errc::kInternal, "capture: read_tokens returned an unexpected size"};
  c.n_tokens = static_cast<uint32_t>(c.k.size() / row);
  c.q.assign(q, q + size_t{s.n_q_heads} * s.head_dim);
  return c;
}

struct head_metrics {
  double rel_err = 0.0;
  double recall = 0.0;
  double chosen_mass = 0.0;
  double topk_mass = 0.0;
};

// SparF at one setting on one captured call.
struct call_metrics {
  uint32_t layer = 0;
  uint32_t n_tokens = 0;
  uint32_t r = 0, k = 0;            // the plan (sparf_resolve)
  std::vector<head_metrics> heads;  // per query head
  sparf_counters counters;          // what sparf_attend read, against the dense equivalent
  // Token pages (K and V) holding a selected token, counted once per kv head even when several
  // selections share them: for per_head selection, the union over the group's query heads.
  uint64_t token_pages_union = 0;
};

// Where the token selection is made. kGroup is SparF (and kv_cache::attend_sparse): one selection
// per kv head, shared by its GQA group. kPerHead is per-query-head SparQ, for comparison only: the
// K/V rows are replicated so each query head gets its own kv head (group 1); on flash it would
// read the union of the group's selections.
enum class selection_scope { kGroup, kPerHead };

// Float64 dense attention of every query head over the stored rows: logits and outputs.
struct dense_reference {
  uint32_t n_q = 0, n_tokens = 0, head_dim = 0;
  std::vector<double> logits;  // [n_q][n_tokens]
  std::vector<double> out;     // [n_q][head_dim]
  std::vector<double> lse;     // [n_q]

  static dense_reference make(const captured_attention& c, const kv_shape& s, double scale) {
    dense_reference r;
    const uint32_t H = s.n_kv_heads, d = s.head_dim, G = s.n_q_heads / s.n_kv_heads, n = c.n_tokens;
    r.n_q = s.n_q_heads;
    r.n_tokens = n;
    r.head_dim = d;
    r.logits.assign(size_t{r.n_q} * n, 0.0);
    r.out.assign(size_t{r.n_q} * d, 0.0);
    r.lse.assign(r.n_q, 0.0);
    std::vector<double> kf(size_t{n} * H * d), vf(kf.size());
    for (size_t i = 0; i < kf.size(); ++i) {
      kf[i] = load_as_float(c.k.data(), s.kv_dtype, static_cast<uint32_t>(i));
      vf[i] = load_as_float(c.v.data(), s.kv_dtype, static_cast<uint32_t>(i));
    }
    for (uint32_t qh = 0; qh < r.n_q; ++qh) {
      const uint32_t h = qh / G;
      const float* q = c.q.data() + size_t{qh} * d;
      double* l = r.logits.data() + size_t{qh} * n;
      double m = -INFINITY;
      for (uint32_t t = 0; t < n; ++t) {
        double dot = 0.0;
        for (uint32_t i = 0; i < d; ++i) dot += double{q[i]} * kf[(size_t{t} * H + h) * d + i];
        l[t] = dot * scale;
        m = std::max(m, l[t]);
      }
      double den = 0.0;
      for (uint32_t t = 0; t < n; ++t) den += std::exp(l[t] - m);
      double* o = r.out.data() + size_t{qh} * d;
      for (uint32_t t = 0; t < n; ++t) {
        const double p = std::exp(l[t] - m) / den;
        for (uint32_t i = 0; i < d; ++i) o[i] += p * vf[(size_t{t} * H + h) * d + i];
      }
      r.lse[qh] = m + std::log(den);
    }
    return r;
  }
};

// The captured rows stored as a SparF backend would hold them: token-indexed chunks and the
// channel-indexed copy (with the V mean). `replicate` > 1 gives every kv head `replicate` copies
// (kv head h becomes heads h * replicate .. h * replicate + replicate - 1).
struct stored_rows {
  std::vector<std::vector<std::byte>> chunks;
  sparf_index index;
};

inline result<stored_rows> store(const captured_attention& c, const kv_shape& s, const sparf_config& cfg,
                                 uint32_t replicate) {
  const uint32_t H = s.n_kv_heads, d = s.head_dim, n = c.n_tokens;
  const uint32_t tpp = cfg.tokens.page.tokens_per_page;
  const uint32_t Hr = H * replicate;
  if (cfg.n_kv_heads() != Hr || cfg.head_dim() != d || cfg.tokens.page.kv_dtype != s.kv_dtype)
    return status{errc::kInvalidArgument, "store: the SparF configuration does not match the captured rows"};
  const size_t row = s.row_bytes();
  std::vector<std::byte> k, v;
  const std::vector<std::byte>* kr = &c.k;
  const std::vector<std::byte>* vr = &c.v;
  if (replicate > 1) {
    k.resize(size_t{n} * Hr * row);
    v.resize(k.size());
    for (uint32_t t = 0; t < n; ++t)
      for (uint32_t hr = 0; hr < Hr; ++hr) {
        const size_t src = (size_t{t} * H + hr / replicate) * row, dst = (size_t{t} * Hr + hr) * row;
        std::copy_n(c.k.data() + src, row, k.data() + dst);
        std::copy_n(c.v.data() + src, row, v.data() + dst);
      }
    kr = &k;
    vr = &v;
  }
  stored_rows out;
  out.chunks.assign((n + tpp - 1) / tpp, std::vector<std::byte>(cfg.tokens.chunk_bytes()));
  for (uint32_t t = 0; t < n; ++t)
    for (uint32_t h = 0; h < Hr; ++h) {
      const size_t src = (size_t{t} * Hr + h) * row;
      std::byte* chunk = out.chunks[t / tpp].data();
      std::copy_n(kr->data() + src, row, chunk + cfg.tokens.offset(kv_kind::kKey, h, t % tpp, 0));
      std::copy_n(vr->data() + src, row, chunk + cfg.tokens.offset(kv_kind::kValue, h, t % tpp, 0));
    }
  auto index = sparf_index::create(cfg.columns);
  if (!index.ok()) return index.error();
  out.index = std::move(index).value();
  INSTINFER_TRY(out.index.append(n, kr->data(), vr->data()));
  return out;
}

// The SparF configuration kv_cache::attend_sparse uses for this cache (same chunk layout, the
// default column pages, the model's logit scale 1/sqrt(head_dim)), or its per-head variant.
inline result<sparf_config> config_for(const kv_cache& cache, selection_scope scope) {
  const kv_shape& s = cache.shape();
  const uint32_t G = s.n_q_heads / s.n_kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
  if (scope == selection_scope::kGroup) return sparf_config::make(cache.layout(), 0, G, scale);
  return sparf_config::make(chunk_layout::make(cache.page(), s.n_q_heads), 0, 1, scale);
}

// Runs SparF at each of `settings` on one captured call and measures it against `ref`.
// outputs (optional) receives each setting's SparF output, [n_q_heads][head_dim].
inline result<std::vector<call_metrics>> evaluate(const captured_attention& c, const kv_shape& s,
                                                  const dense_reference& ref, const sparf_config& cfg,
                                                  selection_scope scope, std::span<const sparf_params> settings,
                                                  sparf_workspace& ws,
                                                  std::vector<std::vector<float>>* outputs = nullptr) {
  const uint32_t G = s.n_q_heads / s.n_kv_heads, d = s.head_dim, n = c.n_tokens, nq = s.n_q_heads;
  const uint32_t replicate = scope == selection_scope::kPerHead ? G : 1;
  auto stored = store(c, s, cfg, replicate);
  if (!stored.ok()) return stored.error();
  const uint32_t tpp = cfg.tokens.page.tokens_per_page;
  const uint32_t n_kv = cfg.n_kv_heads();
  std::vector<call_metrics> results;
  if (outputs) outputs->clear();
  std::vector<float> out(size_t{nq} * d);
  std::vector<uint32_t> idx(n);
  std::vector<char> truth(n);
  for (const sparf_params& p : settings) {
    auto plan = sparf_resolve(p, d, n);
    if (!plan.ok()) return plan.error();
    const uint32_t kcap = std::max<uint32_t>(plan->k, 1);
    std::vector<uint32_t> selected(size_t{n_kv} * kcap), n_selected(n_kv, 0);
    std::vector<const std::byte*> ptrs(stored->chunks.size(), nullptr);
    sparf_work w;
    w.chunks = ptrs.data();
    w.n_chunks = static_cast<uint32_t>(ptrs.size());
    w.n_tokens = n;
    w.column_blocks = stored->index.block_pointers();
    w.n_column_blocks = stored->index.n_blocks();
    w.v_mean = stored->index.v_mean();
    w.q = c.q.data();
    w.out = out.data();
    w.selected = selected.data();
    w.n_selected = n_selected.data();
    // Dual-step loading: select from the column copy, then hand over only the chunks holding a
    // selected token (the others stay null: sparf_attend must not touch them).
    INSTINFER_TRY(sparf_select(cfg, p, std::span<const sparf_work>(&w, 1), ws));
    call_metrics m;
    m.layer = c.layer;
    m.n_tokens = n;
    m.r = plan->r;
    m.k = plan->k;
    std::vector<char> page_used(size_t{s.n_kv_heads} * ptrs.size(), 0);
    for (uint32_t h = 0; h < n_kv; ++h)
      for (uint32_t j = 0; j < n_selected[h]; ++j) {
        const uint32_t page = selected[size_t{h} * kcap + j] / tpp;
        ptrs[page] = stored->chunks[page].data();
        page_used[size_t{h / replicate} * ptrs.size() + page] = 1;
      }
    for (char u : page_used) m.token_pages_union += u ? 2 : 0;  // the K page and the V page
    w.selected = nullptr;
    w.n_selected = nullptr;
    INSTINFER_TRY(sparf_attend(cfg, p, std::span<const sparf_work>(&w, 1), ws, &m.counters));
    if (outputs) outputs->push_back(out);
    for (uint32_t qh = 0; qh < nq; ++qh) {
      head_metrics hm;
      const double* o = ref.out.data() + size_t{qh} * d;
      double num = 0.0, den = 0.0;
      for (uint32_t i = 0; i < d; ++i) {
        const double e = out[size_t{qh} * d + i] - o[i];
        num += e * e;
        den += o[i] * o[i];
      }
      hm.rel_err = std::sqrt(num / std::max(den, 1e-300));
      const double* l = ref.logits.data() + size_t{qh} * n;
      const double lse = ref.lse[qh];
      const uint32_t k = std::min(plan->k, n);
      std::iota(idx.begin(), idx.end(), 0u);
      std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](uint32_t a, uint32_t b) { return l[a] > l[b]; });
      std::fill(truth.begin(), truth.end(), 0);
      for (uint32_t j = 0; j < k; ++j) {
        truth[idx[j]] = 1;
        hm.topk_mass += std::exp(l[idx[j]] - lse);
      }
      // The query head's selection: its group's (kGroup) or its own (kPerHead: kv head qh).
      const uint32_t h = scope == selection_scope::kGroup ? qh / G : qh;
      uint32_t hits = 0;
      for (uint32_t j = 0; j < n_selected[h]; ++j) {
        const uint32_t tok = selected[size_t{h} * kcap + j];
        hits += truth[tok] ? 1 : 0;
        hm.chosen_mass += std::exp(l[tok] - lse);
      }
      hm.recall = k ? static_cast<double>(hits) / k : 1.0;
      m.heads.push_back(hm);
    }
    results.push_back(std::move(m));
  }
  return results;
}

}  // namespace instinfer::model::sparf_eval
