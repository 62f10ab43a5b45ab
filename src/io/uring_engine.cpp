#include "instinfer/io/uring_engine.hpp"

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <fstream>
#include <thread>
#include <vector>

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "uring_ops.hpp"

namespace instinfer::io {

std::string_view io_op_name(io_op op) noexcept {
  switch (op) {
    case io_op::kRead: return ops::op_traits<ops::read_op>::name;
    case io_op::kWrite: return ops::op_traits<ops::write_op>::name;
    case io_op::kFsync: return ops::op_traits<ops::fsync_op>::name;
  }
  return "?";
}

std::string engine_features::describe() const {
  std::string s = "queue_depth=" + std::to_string(queue_depth);
  if (single_issuer) s += " single_issuer";
  if (defer_taskrun) s += " defer_taskrun";
  if (sqpoll) s += " sqpoll";
  if (iopoll) s += " iopoll";
  if (iopoll_fell_back) s += " iopoll_fell_back(no poll queues)";
  s += registered_staging ? " registered_staging" : " plain_staging";
  if (staging_register_errno) s += "(register: " + std::string(std::strerror(staging_register_errno)) + ")";
  s += registered_files ? " registered_files" : " plain_files";
  return s;
}

status check_completion(const completion& c, std::string_view what) {
  if (c.result < 0) return errno_status(-c.result, std::string(what) + " (" + std::string(io_op_name(c.op)) + ")");
  if (c.op != io_op::kFsync && static_cast<uint32_t>(c.result) < c.requested)
    return {errc::kIoError, std::string(what) + ": short " + std::string(io_op_name(c.op)) + " of " +
                                std::to_string(c.result) + " of " + std::to_string(c.requested) + " bytes"};
  return {};
}

// ---- engine ---------------------------------------------------------------------------------

namespace {
// Whether the block device behind `fd` has poll queues (sysfs queue/io_poll); -1 unknown.
int device_has_poll_queues(int fd) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) return -1;
  const dev_t dev = S_ISBLK(st.st_mode) ? st.st_rdev : st.st_dev;
  const std::string base = "/sys/dev/block/" + std::to_string(major(dev)) + ":" + std::to_string(minor(dev));
  for (const char* rel : {"/queue/io_poll", "/../queue/io_poll"}) {
    std::ifstream in(base + rel);
    int v = -1;
    if (in >> v) return v;
  }
  return -1;
}

// A page the IOPOLL probe reads into; never freed, because a probe that timed out may still land.
std::byte* probe_page() {
  static std::byte* page = [] {
    void* p = nullptr;
    if (::posix_memalign(&p, 4096, 4096) != 0) return static_cast<std::byte*>(nullptr);
    return static_cast<std::byte*>(p);
  }();
  return page;
}
}  // namespace

struct uring_engine::impl {
  io_uring ring{};
  bool ring_live = false;
  bool buffers_on_ring = false;  // register_all ran on this ring (staging registration attempted)
  std::vector<int> fds;          // registered (or plain) descriptors by handle
  struct slot {
    uint64_t user_data = 0;
    uint32_t requested = 0;
    uint32_t short_bytes = UINT32_MAX;  // fault seam: cap on the reported result
    io_op op = io_op::kRead;
  };
  std::vector<slot> slots;
  std::vector<uint32_t> free_slots;
  std::vector<completion> synthetic;  // injected failures, reported by the next wait()
  std::thread::id owner{};
  std::vector<io_uring_cqe*> cqes;
};

uring_engine::uring_engine(const engine_options& options) : options_(options), impl_(std::make_unique<impl>()) {}

uring_engine::~uring_engine() {
  if (impl_ && impl_->ring_live) {
    if (std::this_thread::get_id() == impl_->owner || !features_.defer_taskrun) drain();
    io_uring_queue_exit(&impl_->ring);
  }
  if (staging_) ::munmap(staging_, staging_bytes_);
}

result<std::unique_ptr<uring_engine>> uring_engine::create(const engine_options& options) {
  if (options.queue_depth == 0 || options.queue_depth > 4096)
    return status{errc::kInvalidArgument,
                  "queue_depth must be in [1, 4096], got " + std::to_string(options.queue_depth)};
  if (options.staging_bytes % 4096 != 0)
    return status{errc::kInvalidArgument,
                  "staging size must be a multiple of 4096 bytes, got " + std::to_string(options.staging_bytes)};
  if (options.staging_bytes > (1ull << 30))
    return status{errc::kInvalidArgument,
                  "staging size must be at most 1 GiB, got " + std::to_string(options.staging_bytes)};
  std::unique_ptr<uring_engine> e(new (std::nothrow) uring_engine(options));
  if (!e) return status{errc::kOutOfMemory, "io engine"};
  if (options.staging_bytes) {
    void* p = ::mmap(nullptr, options.staging_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
      return errno_status(errno, "staging pool of " + std::to_string(options.staging_bytes) + " bytes");
    e->staging_ = static_cast<std::byte*>(p);
    e->staging_bytes_ = options.staging_bytes;
  }
  auto& im = *e->impl_;
  im.slots.resize(options.queue_depth);
  im.free_slots.reserve(options.queue_depth);
  for (uint32_t i = options.queue_depth; i-- > 0;) im.free_slots.push_back(i);
  im.synthetic.reserve(options.queue_depth);
  im.cqes.resize(options.queue_depth * 2);
  e->features_.queue_depth = options.queue_depth;
  INSTINFER_TRY(e->setup_ring(options.iopoll));
  INSTINFER_TRY(e->register_all());
  return e;
}

status uring_engine::setup_ring(bool with_iopoll) {
  auto& im = *impl_;
  if (im.ring_live) {
    io_uring_queue_exit(&im.ring);
    im.ring_live = false;
  }
  im.buffers_on_ring = false;
  features_.staging_register_errno = 0;
  // Candidate flag sets, most capable first; the kernel's -EINVAL moves us down the list.
  std::vector<std::pair<unsigned, engine_features>> tries;
  const unsigned poll = with_iopoll ? IORING_SETUP_IOPOLL : 0u;
  auto feat = [&](bool si, bool dt, bool sq) {
    engine_features f = features_;
    f.single_issuer = si;
    f.defer_taskrun = dt;
    f.sqpoll = sq;
    f.iopoll = with_iopoll;
    return f;
  };
  if (options_.sqpoll) {
    if (options_.single_issuer)
      tries.push_back({IORING_SETUP_SQPOLL | IORING_SETUP_SINGLE_ISSUER | poll, feat(true, false, true)});
    tries.push_back({IORING_SETUP_SQPOLL | poll, feat(false, false, true)});
  }
  if (options_.single_issuer) {
    tries.push_back({IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | poll, feat(true, true, false)});
    tries.push_back({IORING_SETUP_SINGLE_ISSUER | poll, feat(true, false, false)});
  }
  tries.push_back({poll, feat(false, false, false)});
  int last = 0;
  for (const auto& [flags, f] : tries) {
    io_uring_params p{};
    p.flags = flags;
    if (flags & IORING_SETUP_SQPOLL) p.sq_thread_idle = options_.sqpoll_idle_ms;
    last = io_uring_queue_init_params(options_.queue_depth, &im.ring, &p);
    if (last == 0) {
      features_ = f;
      im.ring_live = true;
      im.owner = std::this_thread::get_id();
      return {};
    }
    if (last != -EINVAL && last != -EPERM) break;
  }
  return errno_status(-last, "io_uring setup (queue depth " + std::to_string(options_.queue_depth) + ")");
}

status uring_engine::register_all() {
  auto& im = *impl_;
  // Buffers stay registered for the ring's life; only a fresh ring needs them.
  if (!im.buffers_on_ring) {
    im.buffers_on_ring = true;
    features_.registered_staging = false;
  }
  if (staging_ && options_.register_staging && !features_.registered_staging && !features_.staging_register_errno) {
    int rc = -options_.simulate_register_error;
    if (rc == 0) {
      iovec iov{staging_, staging_bytes_};
      rc = io_uring_register_buffers(&im.ring, &iov, 1);
    }
    // Pinning can fail (RLIMIT_MEMLOCK: ENOMEM; others): plain buffers work, only slower.
    features_.registered_staging = rc == 0;
    features_.staging_register_errno = rc == 0 ? 0 : -rc;
  }
  features_.registered_files = false;
  if (options_.register_files && !im.fds.empty()) {
    const int rc = io_uring_register_files(&im.ring, im.fds.data(), static_cast<unsigned>(im.fds.size()));
    features_.registered_files = rc == 0;
  }
  return {};
}

bool uring_engine::can_drive() const noexcept {
  return !features_.single_issuer || std::this_thread::get_id() == impl_->owner || idle();
}

status uring_engine::ensure_owner_thread() noexcept {
  auto& im = *impl_;
  if (!features_.single_issuer || std::this_thread::get_id() == im.owner) return {};
  if (!idle())
    return {errc::kBusy,
            "the io_uring ring is single-issuer and has I/O in flight from another thread; "
            "drive it from one thread or open it with single_issuer=0"};
  try {
    const bool poll = features_.iopoll;
    const bool fell_back = features_.iopoll_fell_back;
    INSTINFER_TRY(setup_ring(poll));
    features_.iopoll_fell_back = fell_back;
    return register_all();
  } catch (...) {
    return {errc::kOutOfMemory, "rebuilding the io_uring ring for a new thread"};
  }
}

status uring_engine::probe_iopoll(int fd) {
  // Without poll queues a polled read never reports completion: ask sysfs first, then try one
  // read with a timeout, and rebuild the ring without IOPOLL if either says no.
  bool works = device_has_poll_queues(fd) == 1;
  if (works) {
    std::byte* page = probe_page();
    io_uring_sqe* sqe = page ? io_uring_get_sqe(&impl_->ring) : nullptr;
    works = sqe != nullptr;
    if (works) {
      io_uring_prep_read(sqe, fd, page, 4096, 0);
      io_uring_sqe_set_data64(sqe, UINT64_MAX);
      io_uring_submit(&impl_->ring);
      io_uring_cqe* cqe = nullptr;
      __kernel_timespec ts{1, 0};
      const int rc = io_uring_wait_cqe_timeout(&impl_->ring, &cqe, &ts);
      works = rc == 0 && cqe->res >= 0;
      if (rc == 0) io_uring_cqe_seen(&impl_->ring, cqe);
    }
  }
  if (works) return {};
  INSTINFER_TRY(setup_ring(false));
  features_.iopoll_fell_back = true;
  return register_all();
}

result<uint32_t> uring_engine::add_file(int fd) {
  if (fd < 0) return status{errc::kInvalidArgument, "add_file: invalid descriptor"};
  INSTINFER_TRY(ensure_owner_thread());
  if (!idle()) return status{errc::kBusy, "add_file with I/O in flight"};
  auto& im = *impl_;
  const bool first = im.fds.empty();
  if (features_.registered_files) io_uring_unregister_files(&im.ring);
  im.fds.push_back(fd);
  INSTINFER_TRY(register_all());
  if (first && features_.iopoll) INSTINFER_TRY(probe_iopoll(fd));
  return static_cast<uint32_t>(im.fds.size() - 1);
}

void uring_engine::set_fault(const fault_plan& plan) noexcept {
  fault_ = plan;
  fault_base_ = op_counts_[static_cast<int>(plan.op)];
}

status uring_engine::queue(io_op op, uint32_t file, void* buf, uint32_t len, uint64_t offset,
                           uint64_t user_data) noexcept {
  return queue_impl(op, file, buf, nullptr, len, offset, user_data);
}

status uring_engine::queue_writev(uint32_t file, const iovec* iov, uint32_t n_iov, uint64_t offset,
                                  uint64_t user_data) noexcept {
  if (!iov || n_iov == 0 || n_iov > IOV_MAX) return {errc::kInvalidArgument, "writev: bad iovec count"};
  return queue_impl(io_op::kWrite, file, nullptr, iov, n_iov, offset, user_data);
}

status uring_engine::queue_impl(io_op op, uint32_t file, void* buf, const iovec* iov, uint32_t len_or_iovs,
                                uint64_t offset, uint64_t user_data) noexcept {
  uint32_t len = len_or_iovs;
  if (iov) {
    uint64_t total = 0;
    for (uint32_t i = 0; i < len_or_iovs; ++i) total += iov[i].iov_len;
    if (total > INT32_MAX) return {errc::kInvalidArgument, "writev: more than 2 GiB in one request"};
    len = static_cast<uint32_t>(total);
  }
  INSTINFER_TRY(ensure_owner_thread());
  auto& im = *impl_;
  if (file >= im.fds.size()) return {errc::kInvalidArgument, "unknown file handle " + std::to_string(file)};
  if (queued_ + in_flight_ + synthetic_count_ >= features_.queue_depth)
    return {errc::kBusy, "io queue full (" + std::to_string(features_.queue_depth) + " requests)"};
  if (op == io_op::kFsync && features_.iopoll) return {errc::kUnsupported, "fsync cannot go through an IOPOLL ring"};
  const int k = static_cast<int>(op);
  ++op_counts_[k];
  uint32_t short_bytes = UINT32_MAX;
  if (fault_.nth != 0 && fault_.op == op && op_counts_[k] - fault_base_ == fault_.nth) {
    fault_.nth = 0;
    if (fault_.error_errno != 0) {
      // The op never reaches the device: nothing is read or written.
      im.synthetic.push_back({user_data, -fault_.error_errno, op == io_op::kFsync ? 0 : len, op});
      ++synthetic_count_;
      return {};
    }
    short_bytes = fault_.short_bytes;
  }
  io_uring_sqe* sqe = io_uring_get_sqe(&im.ring);
  if (!sqe) {
    INSTINFER_TRY(submit());
    sqe = io_uring_get_sqe(&im.ring);
    if (!sqe) return {errc::kBusy, "io_uring submission queue full"};
  }
  const ops::file_ref f{features_.registered_files ? static_cast<int>(file) : im.fds[file], features_.registered_files};
  auto* p = static_cast<std::byte*>(buf);
  const bool in_staging = p && staging_ && p >= staging_ && p + len <= staging_ + staging_bytes_;
  const ops::buffer_ref b{buf, (in_staging && features_.registered_staging) ? 0 : -1};
  if (iov) {
    ops::writev_op::prep(sqe, f, iov, len_or_iovs, offset);
  } else {
    switch (op) {
      case io_op::kRead: ops::read_op::prep(sqe, f, b, len, offset); break;
      case io_op::kWrite: ops::write_op::prep(sqe, f, b, len, offset); break;
      case io_op::kFsync: ops::fsync_op::prep(sqe, f, b, len, offset); break;
    }
  }
  const uint32_t s = im.free_slots.back();
  im.free_slots.pop_back();
  im.slots[s] = {user_data, op == io_op::kFsync ? 0 : len, short_bytes, op};
  io_uring_sqe_set_data64(sqe, s);
  ++queued_;
  return {};
}

status uring_engine::submit() noexcept {
  if (queued_ == 0) return {};
  const int rc = io_uring_submit(&impl_->ring);
  if (rc < 0) return errno_status(-rc, "io_uring submit");
  const uint32_t n = std::min<uint32_t>(static_cast<uint32_t>(rc), queued_);
  queued_ -= n;
  in_flight_ += n;
  return {};
}

result<uint32_t> uring_engine::wait(std::span<completion> out, uint32_t min_complete) noexcept {
  auto& im = *impl_;
  if (auto s = submit(); !s.ok()) return s;
  uint32_t n = 0;
  while (n < out.size() && !im.synthetic.empty()) {
    out[n++] = im.synthetic.back();
    im.synthetic.pop_back();
    --synthetic_count_;
  }
  min_complete = std::min<uint32_t>(min_complete, n + in_flight_);
  while (n < out.size() && in_flight_ > 0) {
    unsigned got = io_uring_peek_batch_cqe(
        &im.ring, im.cqes.data(),
        std::min<unsigned>(static_cast<unsigned>(out.size() - n), static_cast<unsigned>(im.cqes.size())));
    if (got == 0) {
      if (n >= min_complete) {
        if (!features_.defer_taskrun && !features_.iopoll) break;
        // Deferred task work and polled rings post completions only when asked to.
        io_uring_get_events(&im.ring);
        got = io_uring_peek_batch_cqe(&im.ring, im.cqes.data(), 1);
        if (got == 0) break;
      } else {
        io_uring_cqe* cqe = nullptr;
        const int rc = io_uring_wait_cqe_nr(&im.ring, &cqe, min_complete - n);
        if (rc == -EINTR || rc == -EAGAIN || rc == -ETIME) continue;
        if (rc < 0) return errno_status(-rc, "io_uring wait");
        continue;
      }
    }
    for (unsigned i = 0; i < got; ++i) {
      const uint64_t s = io_uring_cqe_get_data64(im.cqes[i]);
      int32_t res = im.cqes[i]->res;
      if (s < im.slots.size()) {
        const auto& sl = im.slots[s];
        if (res > 0 && static_cast<uint32_t>(res) > sl.short_bytes) res = static_cast<int32_t>(sl.short_bytes);
        out[n++] = {sl.user_data, res, sl.requested, sl.op};
        im.free_slots.push_back(static_cast<uint32_t>(s));
        --in_flight_;
      }
    }
    io_uring_cq_advance(&im.ring, got);
  }
  return n;
}

result<uint32_t> uring_engine::add_handler(completion_handler& handler) noexcept {
  if (n_handlers_ >= kMaxHandlers)
    return status{errc::kInvalidArgument, "io engine: more than " + std::to_string(kMaxHandlers) + " handlers"};
  handlers_[++n_handlers_] = &handler;
  return n_handlers_;
}

result<uint32_t> uring_engine::dispatch(uint32_t min_complete) noexcept {
  completion done[64];
  auto r = wait(done, min_complete);
  if (!r.ok()) return r;
  for (uint32_t i = 0; i < r.value(); ++i) {
    const uint32_t h = done[i].handler();
    if (h != 0 && h <= n_handlers_) handlers_[h]->on_completion(done[i]);
  }
  return r;
}

void uring_engine::drain() noexcept {
  completion buf[64];
  while (!idle()) {
    auto r = wait(buf, 1);
    if (!r.ok()) break;
  }
}

status uring_engine::sync_io(io_op op, uint32_t file, void* buf, uint32_t len, uint64_t offset) noexcept {
  if (!idle()) return {errc::kBusy, "sync_io with other I/O outstanding"};
  INSTINFER_TRY(queue(op, file, buf, len, offset, 0));
  completion c;
  auto r = wait(std::span<completion>(&c, 1), 1);
  if (!r.ok()) return r.error();
  if (r.value() != 1) return {errc::kInternal, "sync_io: no completion"};
  return check_completion(c, "sync " + std::string(io_op_name(op)) + " at offset " + std::to_string(offset));
}

}  // namespace instinfer::io
