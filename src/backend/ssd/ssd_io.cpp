#include "ssd_io.hpp"

#include <algorithm>
#include <cerrno>
#include <new>

#include <fcntl.h>
#include <sys/statvfs.h>
#include <unistd.h>

namespace instinfer::ssd {

int32_t transfer_result(const io::completion& c) noexcept {
  return c.short_transfer() ? kShortTransfer : c.result;
}

status result_status(int32_t result, const std::string& what) {
  if (result == kShortTransfer) return {errc::kIoError, what + ": short transfer"};
  if (result < 0) return io::errno_status(-result, what);
  return {};
}

namespace {
constexpr uint64_t kDefaultMaxCapacity = 64ull << 30;
}  // namespace

result<uint64_t> ssd_io::size_file(uint64_t capacity_bytes, uint64_t chunk_bytes, bool preallocate) {
  // Capacity in chunks; the file gets its final size (or all its blocks) now.
  const auto& file = *file_;
  uint64_t cap = capacity_bytes;
  if (cap == 0) {
    if (file.block_device) {
      cap = file.size_bytes;
    } else {
      struct statvfs vfs {};
      cap = kDefaultMaxCapacity;
      if (::fstatvfs(file.fd, &vfs) == 0) {
        const uint64_t avail = static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize / 10 * 9 + file.size_bytes;
        cap = std::min(cap, avail);
      }
    }
  }
  if (file.block_device && cap > file.size_bytes)
    return status{errc::kInvalidArgument, "ssd backend: capacity " + std::to_string(cap) + " exceeds the device (" +
                                              std::to_string(file.size_bytes) + " bytes)"};
  const uint64_t capacity_chunks = std::min<uint64_t>(cap / chunk_bytes, UINT32_MAX - 1);
  if (capacity_chunks == 0)
    return status{errc::kInvalidArgument, "ssd backend: capacity " + std::to_string(cap) +
                                              " bytes is smaller than one chunk (" + std::to_string(chunk_bytes) + ")"};
  const uint64_t file_bytes = capacity_chunks * chunk_bytes;
  if (!file.block_device) {
    if (preallocate) {
      const int rc = ::posix_fallocate(file.fd, 0, static_cast<off_t>(file_bytes));
      if (rc != 0) return io::errno_status(rc, "ssd backend: preallocating " + std::to_string(file_bytes) + " bytes");
    } else if (file.size_bytes < file_bytes) {
      // Sparse: the file has its final size, so appends never extend it (cheaper direct writes).
      if (::ftruncate(file.fd, static_cast<off_t>(file_bytes)) != 0)
        return io::errno_status(errno, "ssd backend: sizing '" + file.path + "'");
    }
  }
  return capacity_chunks;
}

ssd_io::~ssd_io() {
  close();
}

void ssd_io::adopt(io::storage_file file) {
  file_ = std::make_unique<io::storage_file>(std::move(file));
}

status ssd_io::open(const io::engine_options& options, uint64_t chunk_bytes) {
  if (!file_) return {errc::kInternal, "ssd io: no file adopted"};
  chunk_bytes_ = chunk_bytes;
  auto e = io::uring_engine::create(options);
  if (!e.ok()) return e.error();
  engine_ = std::move(e.value());
  auto h = engine_->add_file(file_->fd);
  if (!h.ok()) return h.error();
  file_handle_ = h.value();
  auto handler = engine_->add_handler(*this);
  if (!handler.ok()) return handler.error();
  handler_ = handler.value();
  return {};
}

void ssd_io::close() noexcept {
  if (engine_) {
    engine_->drain();
    engine_.reset();
  }
}

status ssd_io::check_thread() const noexcept {
  if (engine_ && !engine_->can_drive())
    return {errc::kBusy,
            "ssd backend: its single-issuer io_uring ring has reads in flight from another thread "
            "(a prefetch); call from that thread, or open the backend with single_issuer=0"};
  return {};
}

status ssd_io::queue(io::io_op op, void* buf, uint32_t len, uint64_t offset, uint64_t user_data) noexcept {
  for (;;) {
    status s = engine_->queue(op, file_handle_, buf, len, offset, user_data);
    if (s.ok() && op == io::io_op::kRead) ++read_requests;
    if (s.code() != errc::kBusy || engine_->idle()) return s;
    INSTINFER_TRY(reap());
  }
}

status ssd_io::queue_writev(const iovec* iov, uint32_t n_iov, uint64_t offset, uint64_t user_data) noexcept {
  for (;;) {
    status s = engine_->queue_writev(file_handle_, iov, n_iov, offset, user_data);
    if (s.code() != errc::kBusy || engine_->idle()) return s;
    INSTINFER_TRY(reap());
  }
}

status ssd_io::reap() noexcept {
  auto r = engine_->dispatch(1);
  if (!r.ok()) return r.error();
  return {};
}

void ssd_io::on_completion(const io::completion& c) noexcept {
  sync_result_ = transfer_result(c);
  sync_done_ = true;
}

status ssd_io::wait_sync() noexcept {
  while (!sync_done_) INSTINFER_TRY(reap());
  return {};
}

status ssd_io::read_sync(void* dst, uint32_t len, uint64_t offset) noexcept {
  sync_done_ = false;
  INSTINFER_TRY(queue(io::io_op::kRead, dst, len, offset, tag(handler_, 0)));
  INSTINFER_TRY(wait_sync());
  return result_status(sync_result_, "ssd backend: read of " + std::to_string(len) + " bytes at offset " +
                                         std::to_string(offset) + " of '" + path() + "'");
}

status ssd_io::fsync() noexcept {
  // A polled ring cannot carry an fsync: ask the kernel directly.
  if (engine_->features().iopoll) {
    if (::fdatasync(file_->fd) != 0) return io::errno_status(errno, "ssd backend: fdatasync '" + path() + "'");
    return {};
  }
  sync_done_ = false;
  INSTINFER_TRY(queue(io::io_op::kFsync, nullptr, 0, 0, tag(handler_, 0)));
  INSTINFER_TRY(wait_sync());
  return result_status(sync_result_, "ssd backend: fdatasync of '" + path() + "'");
}

}  // namespace instinfer::ssd
