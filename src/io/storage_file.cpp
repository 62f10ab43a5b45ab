#include "instinfer/io/storage_file.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace instinfer::io {

storage_file::storage_file(storage_file&& o) noexcept
    : fd(std::exchange(o.fd, -1)),
      lock_fd(std::exchange(o.lock_fd, -1)),
      direct(o.direct),
      block_device(o.block_device),
      created(std::exchange(o.created, false)),
      mem_align(o.mem_align),
      offset_align(o.offset_align),
      size_bytes(o.size_bytes),
      dev(o.dev),
      ino(o.ino),
      path(std::move(o.path)) {}

storage_file& storage_file::operator=(storage_file&& o) noexcept {
  if (this != &o) {
    if (fd >= 0) ::close(fd);
    if (lock_fd >= 0) ::close(lock_fd);
    fd = std::exchange(o.fd, -1);
    lock_fd = std::exchange(o.lock_fd, -1);
    direct = o.direct;
    block_device = o.block_device;
    created = std::exchange(o.created, false);
    mem_align = o.mem_align;
    offset_align = o.offset_align;
    size_bytes = o.size_bytes;
    dev = o.dev;
    ino = o.ino;
    path = std::move(o.path);
  }
  return *this;
}

storage_file::~storage_file() {
  if (fd >= 0) ::close(fd);
  if (lock_fd >= 0) ::close(lock_fd);
}

bool storage_file::remove_if_created() noexcept {
  if (!created || block_device || fd < 0) return false;
  created = false;
  // Only the inode this open created: if the path was replaced meanwhile, it is someone else's.
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0 || st.st_dev != dev || st.st_ino != ino) return false;
  return ::unlink(path.c_str()) == 0;
}

status errno_status(int err, std::string_view what) {
  const std::string msg = std::string(what) + ": " + std::strerror(err);
  switch (err) {
    case ENOSPC:
    case EDQUOT:
    case EFBIG: return {errc::kNoSpace, msg};
    case ENOMEM: return {errc::kOutOfMemory, msg};
    case EINVAL: return {errc::kInvalidArgument, msg};
    default: return {errc::kIoError, msg};
  }
}

namespace {

// Type, size, identity and the direct-I/O alignment of the open descriptor f.fd (f.direct says
// whether O_DIRECT is set on it; it is cleared where the kernel reports no direct I/O).
status describe(storage_file& f, bool allow_buffered) {
  struct stat st {};
  if (::fstat(f.fd, &st) != 0) return errno_status(errno, "fstat '" + f.path + "'");
  f.block_device = S_ISBLK(st.st_mode);
  if (!f.block_device && !S_ISREG(st.st_mode))
    return {errc::kInvalidArgument, "'" + f.path + "' is neither a regular file nor a block device"};
  f.dev = st.st_dev;
  f.ino = st.st_ino;
  if (f.block_device) {
    uint64_t bytes = 0;
    if (::ioctl(f.fd, BLKGETSIZE64, &bytes) == 0) f.size_bytes = bytes;
  } else {
    f.size_bytes = static_cast<uint64_t>(st.st_size);
  }
  struct statx sx {};
  if (f.direct && ::statx(f.fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &sx) == 0 && (sx.stx_mask & STATX_DIOALIGN)) {
    if (sx.stx_dio_offset_align == 0) {
      // The kernel says this file cannot do direct I/O even though the flag was accepted.
      if (!allow_buffered)
        return {errc::kUnsupported, "direct I/O is not supported for '" + f.path +
                                        "' (statx DIOALIGN reports none); opt into buffered=1 explicitly"};
      const int flags = ::fcntl(f.fd, F_GETFL);
      ::fcntl(f.fd, F_SETFL, flags & ~O_DIRECT);
      f.direct = false;
    } else {
      // Keep 4 KiB as the floor: page-sized buffers and offsets are what the callers use anyway.
      f.mem_align = std::max<uint32_t>(4096, sx.stx_dio_mem_align);
      f.offset_align = std::max<uint32_t>(4096, sx.stx_dio_offset_align);
    }
  }
  return {};
}

// One attempt: open (creating exclusively where asked, so `created` is exact), lock, and check
// that the path still names the locked inode. kBusy from a lock held elsewhere; `retry` when the
// path changed under us (a racing remove or replace), to open again.
status open_once(const std::string& path, const storage_open_options& o, storage_file& f, bool& retry) {
  retry = false;
  // O_NOFOLLOW: a symbolic link at the path is refused (ELOOP), not followed.
  const int base = O_RDWR | O_CLOEXEC | O_NOFOLLOW;
  int fd = -1;
  if (o.create) {
    // O_EXCL: only the open that makes the file may later remove it. O_DIRECT is set afterwards
    // (fcntl), because a filesystem that refuses it fails the open after creating the file.
    fd = ::open(path.c_str(), base | O_CREAT | O_EXCL, 0600);
    if (fd >= 0) f.created = true;
    if (fd < 0 && errno != EEXIST) return errno_status(errno, "cannot create '" + path + "'");
  }
  if (fd < 0) {
    fd = ::open(path.c_str(), base);
    if (fd < 0 && errno == ENOENT && o.create) {  // removed between the two opens: start again
      retry = true;
      return {};
    }
    if (fd < 0 && errno == ELOOP)
      return {errc::kInvalidArgument, "'" + path +
                                          "' is a symbolic link; storage files are not opened through links (give "
                                          "the path it points to)"};
    if (fd < 0) return errno_status(errno, "cannot open '" + path + "'");
  }
  f.fd = fd;
  f.path = path;
  INSTINFER_TRY(describe(f, true));  // type and identity; direct I/O is set up below

  if (o.exclusive) {
    // flock, not fcntl (POSIX) locks: a flock lock belongs to the open file description, so two
    // caches on one file conflict inside one process as well as across processes (POSIX record
    // locks are per process and would let the second cache in, and any close of the file by the
    // process drops them); it is released when the last descriptor of that description closes (a
    // killed process included), and it passes through qemu-user unchanged. (On NFS, Linux
    // emulates flock with POSIX locks: per process there.) Its own description: see the header.
    f.lock_fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (f.lock_fd < 0) {
      if (errno == ENOENT || errno == ELOOP) {  // removed or replaced since the first open
        f.created = false;
        retry = true;
        return {};
      }
      return errno_status(errno, "cannot open '" + path + "' to lock it");
    }
    if (::flock(f.lock_fd, LOCK_EX | LOCK_NB) != 0) {
      if (errno == EWOULDBLOCK) {
        f.created = false;  // whoever holds the lock uses the file: never remove it
        return {errc::kBusy, "'" + path +
                                 "' is in use by another cache (in this or another process); each cache needs a "
                                 "file of its own"};
      }
      return errno_status(errno, "cannot lock '" + path + "'");
    }
    // Locked, but the path may have been removed (a cache on destroy) or replaced since the open:
    // then this lock guards a file nobody else can find, so open again.
    struct stat held {
    }, named{};
    if (::fstat(f.lock_fd, &held) != 0 || held.st_dev != f.dev || held.st_ino != f.ino ||
        ::lstat(path.c_str(), &named) != 0 || named.st_dev != f.dev || named.st_ino != f.ino) {
      f.created = false;  // not ours to remove any more
      retry = true;
      return {};
    }
  }

  const int flags = ::fcntl(fd, F_GETFL);
  if (flags >= 0 && ::fcntl(fd, F_SETFL, flags | O_DIRECT) == 0) {
    f.direct = true;
  } else if (!o.allow_buffered) {
    return {errc::kUnsupported, "the filesystem holding '" + path +
                                    "' refuses O_DIRECT; use a file on a filesystem that supports direct I/O, or "
                                    "opt into buffered I/O explicitly with buffered=1"};
  }
  return describe(f, o.allow_buffered);
}

}  // namespace

result<storage_file> open_storage_file(const std::string& path, const storage_open_options& options) {
  if (path.empty()) return status{errc::kInvalidArgument, "storage path is empty"};
  for (int attempt = 0; attempt < 8; ++attempt) {
    storage_file f;
    bool retry = false;
    status s = open_once(path, options, f, retry);
    if (retry) continue;
    if (!s.ok()) {
      f.remove_if_created();  // a failed open leaves nothing behind
      return s;
    }
    return f;
  }
  return status{errc::kBusy, "'" + path + "' kept being removed or replaced while it was opened"};
}

result<storage_file> open_storage_file(const std::string& path, bool create, bool allow_buffered) {
  return open_storage_file(path, storage_open_options{create, allow_buffered, false});
}

result<storage_file> adopt_storage_file(int fd, int lock_fd, std::string path, bool allow_buffered) {
  storage_file f;
  f.fd = fd;
  f.lock_fd = lock_fd;
  f.path = std::move(path);
  if (fd < 0) return status{errc::kInvalidArgument, "adopting storage file '" + f.path + "': no descriptor"};
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0) return errno_status(errno, "adopting storage file '" + f.path + "'");
  if ((flags & O_ACCMODE) != O_RDWR)
    return status{errc::kInvalidArgument, "storage file '" + f.path + "' was not opened for reading and writing"};
  f.direct = (flags & O_DIRECT) != 0;
  if (!f.direct && !allow_buffered)
    return status{errc::kUnsupported, "storage file '" + f.path +
                                          "' was handed over without O_DIRECT; opt into buffered I/O explicitly "
                                          "with buffered=1"};
  INSTINFER_TRY(describe(f, allow_buffered));
  if (lock_fd >= 0) {
    struct stat held {};
    if (::fstat(lock_fd, &held) != 0 || held.st_dev != f.dev || held.st_ino != f.ino)
      return status{errc::kInvalidArgument, "storage file '" + f.path + "': the lock descriptor is another file"};
  }
  return f;
}

}  // namespace instinfer::io
