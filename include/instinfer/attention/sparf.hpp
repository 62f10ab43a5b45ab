// SparF: the paper's flash-aware sparse decode attention (a SparQ over flash pages).
//
// For one (sequence, layer, kv_head) and the query heads of its GQA group: choose the top-r
// channels of |q|, score every token approximately from those K columns of the channel-indexed
// copy, keep the top-k tokens, then run exact attention over just those tokens and blend it with
// mean(V) by alpha, the approximate mass of the kept tokens. Compression 1 (r = head_dim, k = all)
// is dense attention. Dual-step loading: a page holding no selected entry is never read; of the
// pages read only the selected entries are used. `sparf_counters` counts both.
//
// The folder, one job per header:
//   sparf/params.hpp     sparf_params, sparf_plan, sparf_resolve, sparf_counters, sparf_config
//   sparf/workspace.hpp  sparf_workspace (scratch and staging, grow-only)
//   sparf/select.hpp     steps 1-3 -> sparf_selection (sparf_select_head, sparf_choose_channels)
//   sparf/exact.hpp      step 4: staged pseudo-chunks through the one decode kernel, alpha blend
//   sparf/batch.hpp      sparf_work batches: sparf_select / sparf_attend
//   sparf/page_summary.hpp  the second policy (Quest-style page summaries): bound, plan, selection
// The index SparF reads (channel-indexed K copy, V mean) is storage: kv/channel_index.hpp.
#pragma once

#include "instinfer/attention/sparf/batch.hpp"
#include "instinfer/attention/sparf/exact.hpp"
#include "instinfer/attention/sparf/page_summary.hpp"
#include "instinfer/attention/sparf/params.hpp"
#include "instinfer/attention/sparf/select.hpp"
#include "instinfer/attention/sparf/workspace.hpp"
#include "instinfer/kv/channel_index.hpp"

namespace instinfer {

// The index's former name, for the drive, bench and tests until they switch.
using sparf_index = channel_index;

}  // namespace instinfer
