// One small wrapper per io_uring opcode instinfer issues, with the facts about each op in a
// traits type beside it (cutlass's mma_sm80 / mma_traits split). Internal: includes liburing.
#pragma once

#include <liburing.h>
#include <cstdint>

namespace instinfer::io::ops {

// How the file operand of an SQE is named.
struct file_ref {
  int fd_or_index = -1;
  bool registered = false;  // fd_or_index is an index into the registered file table
};

// How the buffer operand is named.
struct buffer_ref {
  void* data = nullptr;
  int registered_index = -1;  // >= 0: the buffer lies inside registered buffer #index
};

inline void set_file(io_uring_sqe* sqe, file_ref f) noexcept {
  if (f.registered) sqe->flags |= IOSQE_FIXED_FILE;
}

// ---- IORING_OP_READ / IORING_OP_READ_FIXED --------------------------------------------------
struct read_op {
  static void prep(io_uring_sqe* sqe, file_ref f, buffer_ref b, uint32_t len, uint64_t offset) noexcept {
    if (b.registered_index >= 0)
      io_uring_prep_read_fixed(sqe, f.fd_or_index, b.data, len, offset, b.registered_index);
    else
      io_uring_prep_read(sqe, f.fd_or_index, b.data, len, offset);
    set_file(sqe, f);
  }
};

// ---- IORING_OP_WRITE / IORING_OP_WRITE_FIXED ------------------------------------------------
struct write_op {
  static void prep(io_uring_sqe* sqe, file_ref f, buffer_ref b, uint32_t len, uint64_t offset) noexcept {
    if (b.registered_index >= 0)
      io_uring_prep_write_fixed(sqe, f.fd_or_index, b.data, len, offset, b.registered_index);
    else
      io_uring_prep_write(sqe, f.fd_or_index, b.data, len, offset);
    set_file(sqe, f);
  }
};

// ---- IORING_OP_WRITEV: several buffers to one contiguous device range ---------------------
struct writev_op {
  static void prep(io_uring_sqe* sqe, file_ref f, const iovec* iov, unsigned n_iov, uint64_t offset) noexcept {
    io_uring_prep_writev(sqe, f.fd_or_index, iov, n_iov, offset);
    set_file(sqe, f);
  }
};

// ---- IORING_OP_FSYNC (datasync) -------------------------------------------------------------
struct fsync_op {
  static void prep(io_uring_sqe* sqe, file_ref f, buffer_ref, uint32_t, uint64_t) noexcept {
    io_uring_prep_fsync(sqe, f.fd_or_index, IORING_FSYNC_DATASYNC);
    set_file(sqe, f);
  }
};

template <class Op>
struct op_traits;

template <>
struct op_traits<read_op> {
  static constexpr const char* name = "read";
  static constexpr uint8_t opcode = IORING_OP_READ;
  static constexpr uint8_t fixed_opcode = IORING_OP_READ_FIXED;
  static constexpr bool moves_data = true;
  static constexpr bool writes_device = false;
  static constexpr bool needs_dio_alignment = true;  // buffer, length and offset under O_DIRECT
  static constexpr bool iopoll_capable = true;
};
template <>
struct op_traits<write_op> {
  static constexpr const char* name = "write";
  static constexpr uint8_t opcode = IORING_OP_WRITE;
  static constexpr uint8_t fixed_opcode = IORING_OP_WRITE_FIXED;
  static constexpr bool moves_data = true;
  static constexpr bool writes_device = true;
  static constexpr bool needs_dio_alignment = true;
  static constexpr bool iopoll_capable = true;
};
template <>
struct op_traits<writev_op> {
  static constexpr const char* name = "writev";
  static constexpr uint8_t opcode = IORING_OP_WRITEV;
  static constexpr uint8_t fixed_opcode = IORING_OP_WRITEV;  // no fixed-buffer form
  static constexpr bool moves_data = true;
  static constexpr bool writes_device = true;
  static constexpr bool needs_dio_alignment = true;  // every iovec, and the offset
  static constexpr bool iopoll_capable = true;
};
template <>
struct op_traits<fsync_op> {
  static constexpr const char* name = "fsync";
  static constexpr uint8_t opcode = IORING_OP_FSYNC;
  static constexpr uint8_t fixed_opcode = IORING_OP_FSYNC;
  static constexpr bool moves_data = false;
  static constexpr bool writes_device = true;
  static constexpr bool needs_dio_alignment = false;
  static constexpr bool iopoll_capable = false;  // not allowed on an IOPOLL ring
};

static_assert(op_traits<read_op>::fixed_opcode == IORING_OP_READ_FIXED);
static_assert(!op_traits<fsync_op>::iopoll_capable);

}  // namespace instinfer::io::ops
