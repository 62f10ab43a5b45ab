// The files a cache keeps its pages in (an ssd: backend's file, a drive's flash): opened for direct
// I/O, private and exclusive.
//
// * Private: a file instinfer creates is mode 0600 (it holds prompt-derived data), and the last
//   path component is never followed through a symbolic link (O_NOFOLLOW): a link planted at the
//   path cannot redirect the writes onto another file or a disk.
// * Exclusive: with `exclusive`, the open holds an advisory lock on the file for as long as the
//   storage_file lives; a second exclusive open of the same file, in this process or another, is
//   kBusy. The lock is taken on a descriptor of its own (lock_fd), never registered with an
//   io_uring ring: a ring drops its files asynchronously after it is closed, so a lock on the I/O
//   descriptor would outlive the cache for a moment and refuse an immediate reopen. Closing
//   lock_fd (explicitly, or by a killed process's exit) releases the lock at once.
// * Removable: `created` says this open made the file; remove_if_created() unlinks exactly that
//   file (never a file that was there before, never a block device).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "instinfer/core/status.hpp"

namespace instinfer::io {

// A file opened for the engine. Owns its descriptors.
struct storage_file {
  int fd = -1;          // for I/O (the one to register with an engine)
  int lock_fd = -1;     // holds the exclusive lock (a separate open file description); -1: none
  bool direct = false;  // O_DIRECT in effect
  bool block_device = false;
  bool created = false;          // the open created it
  uint32_t mem_align = 4096;     // buffer alignment O_DIRECT needs (statx DIOALIGN, else 4096)
  uint32_t offset_align = 4096;  // offset/length alignment
  uint64_t size_bytes = 0;       // file size / device capacity at open
  uint64_t dev = 0, ino = 0;     // identity of the opened inode
  std::string path;

  storage_file() = default;
  storage_file(storage_file&& o) noexcept;
  storage_file& operator=(storage_file&& o) noexcept;
  storage_file(const storage_file&) = delete;
  storage_file& operator=(const storage_file&) = delete;
  ~storage_file();

  bool locked() const noexcept { return lock_fd >= 0; }
  // Unlink the path if this open created it and the path still names this file (the descriptors
  // and the lock stay: call it before closing, so no other cache can have the file meanwhile).
  // True when removed.
  bool remove_if_created() noexcept;
};

struct storage_open_options {
  bool create = false;          // create the file (mode 0600) when it does not exist
  bool allow_buffered = false;  // open through the page cache where the filesystem refuses O_DIRECT
  bool exclusive = false;       // hold the lock; kBusy when another open holds it
};

// Open (and create, if asked and missing) a regular file or block device for direct I/O. A
// symbolic link at `path` is kInvalidArgument. When the filesystem refuses O_DIRECT the result is
// kUnsupported with an explanation, unless `allow_buffered` (an explicit opt-in), which opens it
// through the page cache instead. A file created by a failed open is removed again.
result<storage_file> open_storage_file(const std::string& path, const storage_open_options& options);
// The same, not exclusive (tools and tests that open scratch files).
result<storage_file> open_storage_file(const std::string& path, bool create, bool allow_buffered);

// Descriptors another process opened and handed over (a drive's flash from the host that started
// it): takes ownership of `fd` and `lock_fd` (-1: none); O_DIRECT, type, size and alignment are
// read from fd. `created` is false: removing the file is the opener's business. The lock is
// shared: it belongs to lock_fd's open file description, which both processes now hold, so it
// lasts until both have closed it.
result<storage_file> adopt_storage_file(int fd, int lock_fd, std::string path, bool allow_buffered);

// errno -> status: ENOSPC/EDQUOT/EFBIG -> kNoSpace, ENOMEM -> kOutOfMemory, EINVAL ->
// kInvalidArgument, others -> kIoError.
status errno_status(int err, std::string_view what);

}  // namespace instinfer::io
