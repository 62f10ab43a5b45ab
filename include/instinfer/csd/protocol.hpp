// The emulated CSD's command protocol: NVMe-style submission and completion entries.
//
// Host and drive share exactly one thing: a memory region holding queue pairs (queue_pair.hpp)
// and, per queue pair, a data area that stands in for the host buffers an NVMe command points at
// with PRPs. A submission entry names the data it carries host -> drive (data_offset, data_bytes)
// and the room for its result drive -> host (result_offset, result_bytes), both inside the queue
// pair's data area. Everything else (page tables, L2P, flash, the DRAM group buffer) lives in the
// drive process and is unreachable from the host.
//
// Entries are fixed-layout, trivially copyable structs; the command-specific arguments are one
// of the *_args structs below, memcpy'd into `args`. Every field is validated by the drive;
// data_offset and result_offset must be 8-byte aligned (as NVMe PRPs must be dword-aligned).
//
// Link accounting (what the link model charges and both sides count): a command costs
// sizeof(sq_entry) + data_bytes host -> drive and sizeof(cq_entry) + the result bytes the drive
// actually produced drive -> host.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace instinfer::csd {

// 2: SparF in the drive; 3: compute and program model in the stats; 4: persistent namespaces
// (commit, recover; namespace_config::persist); 5: causal chunk attention (attend-chunk); 6: the
// attend-sparse parameters' extension (sinks, recent window, policy: sparf_wire_ext) and page
// summaries in the drive (namespace_config::page_summaries, the page-summary policy); 7: SparF's
// channel share (sparf_wire_ext2)
inline constexpr uint32_t kProtocolVersion = 7;

enum class opcode : uint8_t {
  kIdentify = 0x01,  // result: identify_data
  kConfig = 0x02,    // create a namespace: data = namespace_config; result: namespace_info
  kDeleteNamespace = 0x03,
  kWriteKv = 0x10,       // data = chunk ids, then K, then V (see write_kv_args)
  kAttend = 0x11,        // data = attend_entry[n], then q; result = out, then lse
  kReclaim = 0x12,       // free chunks / a sequence / a range of a sequence's page table; erase
  kMap = 0x13,           // set a (seq, layer) page table: data = chunk ids
  kCopy = 0x14,          // copy the first n tokens of a chunk into a fresh chunk (fork of a tail)
  kRead = 0x15,          // read a chunk back: result = the chunk's bytes
  kAttendSparse = 0x16,  // SparF: data = sparf_wire_params, attend_entry[n], q; result = out, lse, counters
  kCommit = 0x17,        // persistent namespace: data = chunk ids, then the host's tables (commit_args)
  kRecover = 0x18,       // persistent namespace: result = the host's tables of the last commit (recover_args)
  kAttendChunk = 0x19,   // causal chunk (prefill): data = attend_chunk_entry[n], q rows; result = out rows, lse rows
  kStats = 0x20,         // result: device_stats
  kShutdown = 0x7f,      // the drive exits after completing this command
};

constexpr const char* opcode_name(opcode op) noexcept {
  switch (op) {
    case opcode::kIdentify: return "identify";
    case opcode::kConfig: return "config";
    case opcode::kDeleteNamespace: return "delete-namespace";
    case opcode::kWriteKv: return "write-kv";
    case opcode::kAttend: return "attend";
    case opcode::kReclaim: return "reclaim";
    case opcode::kMap: return "map";
    case opcode::kCopy: return "copy";
    case opcode::kRead: return "read";
    case opcode::kAttendSparse: return "attend-sparse";
    case opcode::kCommit: return "commit";
    case opcode::kRecover: return "recover";
    case opcode::kAttendChunk: return "attend-chunk";
    case opcode::kStats: return "stats";
    case opcode::kShutdown: return "shutdown";
  }
  return "unknown";
}

// Submission queue entry: 64 bytes, like NVMe's.
struct sq_entry {
  uint8_t opcode = 0;
  uint8_t flags = 0;
  uint16_t cid = 0;          // command id, echoed in the completion
  uint32_t nsid = 0;         // namespace (0 for identify, config, stats of the whole drive)
  uint64_t data_offset = 0;  // host -> drive payload inside the queue pair's data area
  uint32_t data_bytes = 0;
  uint32_t result_bytes = 0;  // room for drive -> host payload
  uint64_t result_offset = 0;
  uint8_t args[32] = {};  // command-specific: one of the *_args structs
};
static_assert(sizeof(sq_entry) == 64);
static_assert(std::is_trivially_copyable_v<sq_entry>);
static_assert(offsetof(sq_entry, nsid) == 4 && offsetof(sq_entry, data_offset) == 8);
static_assert(offsetof(sq_entry, result_offset) == 24 && offsetof(sq_entry, args) == 32);

// Completion queue entry: 16 bytes, like NVMe's.
struct cq_entry {
  uint64_t result = 0;       // bytes of result payload the drive produced
  uint32_t modelled_ns = 0;  // modelled drive time of this command (flash + link), saturating
  uint16_t cid = 0;
  int16_t status = 0;  // 0 or an instinfer::errc value; the message is in the error log
};
static_assert(sizeof(cq_entry) == 16);
static_assert(std::is_trivially_copyable_v<cq_entry>);
static_assert(offsetof(cq_entry, cid) == 12 && offsetof(cq_entry, status) == 14);

template <class Args>
inline void set_args(sq_entry& e, const Args& a) noexcept {
  static_assert(std::is_trivially_copyable_v<Args> && sizeof(Args) <= sizeof(e.args));
  std::memcpy(e.args, &a, sizeof a);
}
template <class Args>
inline Args get_args(const sq_entry& e) noexcept {
  static_assert(std::is_trivially_copyable_v<Args> && sizeof(Args) <= sizeof(e.args));
  Args a;
  std::memcpy(&a, e.args, sizeof a);
  return a;
}

// ---- identify -----------------------------------------------------------------------------------
struct identify_data {
  uint32_t version = kProtocolVersion;
  uint32_t page_bytes = 0;
  uint32_t channels = 0;
  uint32_t dies_per_channel = 0;
  uint32_t pages_per_block = 0;
  uint32_t blocks_per_channel = 0;
  uint32_t n_cores = 0;  // attention worker threads
  uint32_t max_namespaces = 0;
  uint64_t capacity_bytes = 0;  // flash bytes
  uint64_t buffer_bytes = 0;    // DRAM group buffer
  uint8_t direct_io = 0;        // file flash opened with O_DIRECT
  uint8_t ram_flash = 0;        // RAM-backed flash
  uint8_t isa = 0;              // instinfer::cpu_isa of the attention kernel
  uint8_t reserved0 = 0;
  uint32_t reserved1 = 0;
  char arch[16] = {};  // "x86_64", "aarch64"
};
static_assert(sizeof(identify_data) == 72);
static_assert(std::is_trivially_copyable_v<identify_data>);

// ---- config: create a namespace for one cache ---------------------------------------------------
// The drive holds kv heads [kv_head_begin, kv_head_begin + n_kv_heads) of the model (heads are
// partitioned over drives); n_kv_heads and group_size describe *this drive's* share.
struct namespace_config {
  uint32_t n_layers = 0;
  uint32_t n_kv_heads = 0;  // on this drive
  uint32_t group_size = 0;  // query heads per kv head
  uint32_t head_dim = 0;
  uint32_t page_bytes = 0;     // must equal the drive's flash page
  uint8_t kv_dtype = 0;        // instinfer::dtype
  uint8_t sparf = 0;           // 1: keep the channel-indexed K copy (SparF) in this namespace
  uint8_t persist = 0;         // 1: the namespace survives the drive (FLASH.meta; docs/persistence.md)
  uint8_t page_summaries = 0;  // 1: keep per page group and kv head the min / max of K (page-summary policy)
  float scale = 0.0f;          // logit scale; 0 = 1/sqrt(head_dim)
  float softcap = 0.0f;
  uint32_t kv_head_begin = 0;            // informational: first model kv head held here
  uint32_t sparf_channels_per_page = 0;  // column page width (channel_layout), resolved by the host
  uint64_t capacity_chunks = 0;          // logical chunks wanted; 0 = what the flash can hold
};
static_assert(sizeof(namespace_config) == 48);
static_assert(std::is_trivially_copyable_v<namespace_config>);

// Chunk ids of a namespace are global: [chunk_base, chunk_base + chunk_count). A command naming a
// chunk outside its namespace's range is rejected.
struct namespace_info {
  uint32_t nsid = 0;
  uint32_t tokens_per_page = 0;
  uint64_t chunk_base = 0;
  uint64_t chunk_count = 0;
};
static_assert(sizeof(namespace_info) == 24);

// ---- commit / recover (persistent namespaces) ---------------------------------------------------
// Commit: make every chunk named in the payload durable with its checksums, then atomically
// replace the drive's metadata file with those chunks' mapping and `table_bytes` opaque bytes of
// the host (its page tables, stored and returned verbatim). Payload: u32 chunk ids [n_chunks],
// then the table bytes. Chunks not named lose their pages at the next commit, not before.
struct commit_args {
  uint32_t n_chunks = 0;
  uint32_t table_bytes = 0;
};
// Recover: the host's table bytes of the commit found when the namespace was configured. Result:
// u64 total table bytes, then the bytes from `offset` on (as many as the result room holds).
struct recover_args {
  uint64_t offset = 0;
};

// ---- write KV -----------------------------------------------------------------------------------
// Tokens [first_token, first_token + n_tokens) of sequence `seq`, layer `layer`, where first_token
// counts from the start of chunk `chunks[0]`, and chunks[i] sits at position first_index + i of the
// (seq, layer) page table (the drive mirrors the table from these writes). Decode: one token, one
// chunk. Prefill: a range of tokens over n_chunks chunks, each filled in turn.
// data = u32 chunks[n_chunks], K [n_tokens][n_kv_heads][head_dim], V [same], in the cache dtype.
struct write_kv_args {
  uint64_t seq = 0;
  uint32_t layer = 0;
  uint32_t first_index = 0;
  uint32_t first_token = 0;  // < tokens_per_page; must equal the tokens chunks[0] already holds
  uint32_t n_tokens = 0;
  uint32_t n_chunks = 0;
  uint32_t reserved = 0;
};
static_assert(sizeof(write_kv_args) == 32);

// ---- attend -------------------------------------------------------------------------------------
// data = attend_entry[n_items], then q [n_items][n_q_heads][head_dim] f32 (this drive's q heads).
// result = out [n_items][n_q_heads][head_dim] f32 (normalised), then lse [n_items][n_q_heads] f32.
struct attend_args {
  uint32_t layer = 0;
  uint32_t n_items = 0;
};
struct attend_entry {
  uint64_t seq = 0;
  uint32_t n_tokens = 0;  // tokens of this (seq, layer) to attend over
  uint32_t reserved = 0;
};
static_assert(sizeof(attend_entry) == 16);

// ---- attend chunk: causal chunk attention (prefill) ---------------------------------------------
// Item i has n_rows query rows at positions first_pos .. first_pos + n_rows - 1; row r sees tokens
// [0, first_pos + r] of the item's n_tokens (first_pos + n_rows <= n_tokens). The rows of all
// items follow each other: data = attend_chunk_entry[n_items], then q [n_rows total][n_q_heads]
// [head_dim] f32; result = out [n_rows total][n_q_heads][head_dim] f32, then lse [n_rows total]
// [n_q_heads] f32. Only queries and outputs cross the link; the drive reads each K/V page of an
// item once per kv head for all its rows.
struct attend_chunk_args {
  uint32_t layer = 0;
  uint32_t n_items = 0;
  uint32_t n_rows = 0;  // sum of the items' n_rows
};
struct attend_chunk_entry {
  uint64_t seq = 0;
  uint32_t n_tokens = 0;
  uint32_t n_rows = 0;
  uint32_t first_pos = 0;
  uint32_t reserved = 0;
};
static_assert(sizeof(attend_chunk_entry) == 24);
static_assert(std::is_trivially_copyable_v<attend_chunk_entry>);

// ---- attend sparse (SparF, page summaries) ------------------------------------------------------
// args = attend_sparse_args. data = the parameters (params_bytes: sparf_wire_params, then, since
// protocol 6, sparf_wire_ext), then attend_entry[n_items], then q as for attend. result = out, then
// lse (as for attend), then one sparf_wire_counters for the whole command.
// SparF: the drive reads the chosen column pages of its channel-indexed K copy, selects tokens,
// then reads only the K and V pages holding them (dual-step loading); its flash counters show it.
// Page summaries: the drive scores its page groups from their K min / max and reads the chosen
// groups' K and V pages whole.
struct attend_sparse_args {  // attend_args with the parameters' size: a protocol-5 host leaves it 0
  uint32_t layer = 0;
  uint32_t n_items = 0;
  // 0 or sizeof(sparf_wire_params): no extension (protocol 5); kSparfParamsBytesV6: with
  // sparf_wire_ext (protocol 6); kSparfParamsBytes: with both extensions
  uint32_t params_bytes = 0;
  uint32_t reserved = 0;
};
static_assert(sizeof(attend_sparse_args) == 16 &&
              offsetof(attend_sparse_args, n_items) == offsetof(attend_args, n_items));
struct sparf_wire_params {  // instinfer::sparf_params on the wire
  double compression = 0.0;
  double page_spread = 0.0;
  uint32_t r = 0;
  uint32_t k = 0;
  uint8_t mode = 0;  // instinfer::sparf_mode
  uint8_t whole_pages = 1;
  uint8_t reserved[6] = {};
};
static_assert(sizeof(sparf_wire_params) == 32);
static_assert(std::is_trivially_copyable_v<sparf_wire_params>);
// Protocol 6: what follows sparf_wire_params (the fields sparf_params gained since); reserved
// bytes must be zero.
struct sparf_wire_ext {
  uint32_t sink_tokens = 0;
  uint32_t window_tokens = 0;
  uint8_t policy = 0;  // instinfer::sparse_policy
  uint8_t reserved[7] = {};
};
static_assert(sizeof(sparf_wire_ext) == 16);
static_assert(std::is_trivially_copyable_v<sparf_wire_ext>);
inline constexpr uint32_t kSparfParamsBytesV6 = sizeof(sparf_wire_params) + sizeof(sparf_wire_ext);
// Protocol 7: what follows sparf_wire_ext; reserved bytes must be zero.
struct sparf_wire_ext2 {
  double channel_share = 0.0;  // sparf_params::channel_share
  uint8_t reserved[8] = {};
};
static_assert(sizeof(sparf_wire_ext2) == 16);
static_assert(std::is_trivially_copyable_v<sparf_wire_ext2>);
inline constexpr uint32_t kSparfParamsBytes = kSparfParamsBytesV6 + sizeof(sparf_wire_ext2);
struct sparf_wire_counters {  // instinfer::sparf_counters on the wire
  uint64_t token_pages_read = 0;
  uint64_t channel_pages_read = 0;
  uint64_t token_bytes_used = 0;
  uint64_t channel_bytes_used = 0;
  uint64_t buffered_channel_bytes = 0;
  uint64_t dense_pages = 0;
  uint64_t dense_bytes = 0;
  uint64_t selected_tokens = 0;
  uint64_t channels_used = 0;
  uint64_t items = 0;
};
static_assert(sizeof(sparf_wire_counters) == 80);

// ---- reclaim ------------------------------------------------------------------------------------
enum class reclaim_mode : uint8_t {
  kChunks = 0,     // data = u32 chunk ids: their pages become invalid
  kSequence = 1,   // forget the sequence's page tables (its chunks are freed by kChunks)
  kRange = 2,      // drop page-table positions [begin, end) of (seq, layer)
  kEraseOnly = 3,  // nothing freed: just erase dead blocks
};
// After freeing, whole blocks whose pages are all invalid are erased, least recently written
// first, until `erase_target_blocks` blocks are free (0: erase every dead block). Valid pages are
// never copied.
struct reclaim_args {
  uint64_t seq = 0;
  uint32_t layer = 0;
  uint32_t begin = 0;
  uint32_t end = 0;
  uint32_t n_chunks = 0;
  uint32_t erase_target_blocks = 0;
  uint8_t mode = 0;
  uint8_t reserved[3] = {};
};
static_assert(sizeof(reclaim_args) == 32);

// ---- map: set a (seq, layer) page table (after a fork or truncation the host's changed) ---------
struct map_args {
  uint64_t seq = 0;
  uint32_t layer = 0;
  uint32_t n_chunks = 0;  // data = u32 chunk ids
};

// ---- copy / read --------------------------------------------------------------------------------
struct copy_args {
  uint64_t seq = 0;  // owner hint of dst (its page-table position)
  uint32_t layer = 0;
  uint32_t index = 0;
  uint32_t dst = 0;
  uint32_t src = 0;
  uint32_t n_tokens = 0;
};
struct read_args {
  uint32_t chunk = 0;
  uint32_t n_tokens = 0;  // result = chunk bytes (2 * n_kv_heads pages, chunk_layout order)
};

// ---- stats --------------------------------------------------------------------------------------
struct device_stats {
  uint64_t commands = 0;
  uint64_t commands_failed = 0;
  uint64_t link_bytes_host_to_device = 0;
  uint64_t link_bytes_device_to_host = 0;
  uint64_t kv_bytes_appended = 0;  // K+V payload bytes of write commands
  uint64_t flash_pages_read = 0;
  uint64_t flash_pages_programmed = 0;
  uint64_t flash_pages_erased = 0;  // pages in erased blocks
  uint64_t blocks_erased = 0;
  uint64_t buffer_evictions = 0;  // partial chunks programmed because the buffer was full
  uint64_t buffer_reloads = 0;
  uint64_t free_blocks = 0;
  uint64_t total_blocks = 0;
  uint64_t valid_pages = 0;
  uint64_t page_bytes = 0;
  uint64_t modelled_ns = 0;  // model, all commands: each max(link, flash, compute)
  uint64_t modelled_flash_ns = 0;
  uint64_t modelled_link_ns = 0;
  uint64_t cpu_ns = 0;          // real CPU time of the drive's workers in attend
  uint64_t attend_wall_ns = 0;  // real wall time of attend commands
  // SparF (flash pages are also in flash_pages_read / flash_pages_programmed above)
  uint64_t sparse_attends = 0;             // attend-sparse commands completed
  uint64_t column_pages_programmed = 0;    // channel-indexed K pages written
  uint64_t column_pages_read = 0;          // of them, read by attend-sparse
  uint64_t sparse_token_pages_read = 0;    // token-indexed K/V pages read from flash by attend-sparse
  uint64_t column_rebuild_pages_read = 0;  // token pages read to rebuild column data after a fork or truncation
  uint64_t column_blocks = 0;              // column blocks on flash now
  uint64_t column_tail_evictions = 0;      // column tails dropped from DRAM (over the buffer budget)
  // Model (models.hpp): a command's modelled time is max(link, flash, compute), summed in modelled_ns.
  uint64_t modelled_compute_ns = 0;  // embedded cores' time for the attention work, all commands
  uint64_t modelled_program_ns = 0;  // die time of page programs (bus transfer + tPROG); reads behind them wait
  uint64_t attend_flops = 0;         // modelled flops of the attention work (attend_work::flops)
  // Page summaries (flash pages also in flash_pages_read)
  uint64_t page_summary_attends = 0;        // attend-sparse commands of the page-summary policy completed
  uint64_t page_summary_pages_read = 0;     // token-indexed K/V pages read from flash by them
  uint64_t summary_rebuild_pages_read = 0;  // K pages read to rebuild a summary (a truncated tail)
  uint64_t summary_bytes = 0;               // DRAM held by page summaries now
};
static_assert(std::is_trivially_copyable_v<device_stats>);
static_assert(sizeof(device_stats) == 34 * 8);

// Bytes a command costs on the link, as both sides count them.
constexpr uint64_t link_bytes_in(uint32_t data_bytes) noexcept {
  return sizeof(sq_entry) + uint64_t{data_bytes};
}
constexpr uint64_t link_bytes_out(uint64_t result_bytes) noexcept {
  return sizeof(cq_entry) + result_bytes;
}

}  // namespace instinfer::csd
