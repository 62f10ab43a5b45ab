#include "flash_store.hpp"

#include <unistd.h>
#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <vector>

#include "instinfer/io/uring_engine.hpp"

namespace instinfer::csd {
namespace {

status errno_error(int err, const std::string& what) {
  const errc code = (err == ENOSPC || err == EDQUOT || err == EFBIG) ? errc::kNoSpace
                    : err == ENOMEM                                  ? errc::kOutOfMemory
                                                                     : errc::kIoError;
  return {code, what + ": " + std::strerror(err)};
}

// ---- RAM flash ----------------------------------------------------------------------------------
class ram_flash final : public flash_store {
 public:
  explicit ram_flash(const flash_params& p) : p_(p), blocks_(p.total_blocks()) {}

  status program(uint32_t ppn, uint32_t n_pages, const std::byte* src) noexcept override {
    const uint64_t block = ppn / p_.pages_per_block;
    const uint32_t in_block = ppn % p_.pages_per_block;
    if (block >= blocks_.size() || in_block + n_pages > p_.pages_per_block)
      return {errc::kInternal, "program outside a block"};
    std::lock_guard lock(mutex_);
    auto& b = blocks_[block];
    if (!b) {
      b.reset(new (std::nothrow) std::byte[uint64_t{p_.pages_per_block} * p_.page_bytes]);
      if (!b) return {errc::kOutOfMemory, "RAM flash: cannot allocate a block"};
    }
    std::memcpy(b.get() + uint64_t{in_block} * p_.page_bytes, src, uint64_t{n_pages} * p_.page_bytes);
    return {};
  }
  status erase_block(uint32_t first_ppn) noexcept override {
    const uint64_t block = first_ppn / p_.pages_per_block;
    if (block >= blocks_.size()) return {errc::kInternal, "erase outside the flash"};
    std::lock_guard lock(mutex_);
    blocks_[block].reset();
    return {};
  }
  status read(uint32_t ppn, std::byte* dst) noexcept override {
    const uint64_t block = ppn / p_.pages_per_block;
    if (block >= blocks_.size()) return {errc::kInternal, "read outside the flash"};
    // Readers run concurrently with each other, never with program/erase of the pages they read
    // (the drive serialises commands), so the block pointer is stable here.
    const std::byte* b = blocks_[block].get();
    if (!b) return {errc::kCorruptData, "read of an erased block"};
    std::memcpy(dst, b + uint64_t{ppn % p_.pages_per_block} * p_.page_bytes, p_.page_bytes);
    return {};
  }
  result<std::unique_ptr<page_reader>> make_reader(uint32_t) noexcept override {
    return std::unique_ptr<page_reader>(new ram_reader(*this));
  }
  status sync() noexcept override { return {}; }
  bool direct_io() const noexcept override { return false; }
  bool ram() const noexcept override { return true; }

 private:
  class ram_reader final : public page_reader {
   public:
    explicit ram_reader(ram_flash& f) : f_(f) {}
    status queue(uint32_t ppn, std::byte* dst) noexcept override {
      if (!pending_.ok()) return {};
      pending_ = f_.read(ppn, dst);
      return {};
    }
    status submit() noexcept override { return {}; }
    status wait_all() noexcept override {
      status s = std::move(pending_);
      pending_ = {};
      return s;
    }

   private:
    ram_flash& f_;
    status pending_;
  };

  flash_params p_;
  std::mutex mutex_;
  std::vector<std::unique_ptr<std::byte[]>> blocks_;
};

// ---- file flash (io_uring + O_DIRECT, through the shared engine of src/io) ----------------------
class file_flash final : public flash_store {
 public:
  file_flash(const flash_params& p, io::storage_file f, std::unique_ptr<io::uring_engine> writer, uint32_t handle,
             bool keep)
      : p_(p), file_(std::move(f)), writer_(std::move(writer)), write_handle_(handle), keep_(keep) {}
  ~file_flash() override {
    // The flash's contents mean nothing without the FTL's tables, which die with the drive: a
    // file the drive created goes with it (a handed-over one is its host's to remove).
    if (!keep_) file_.remove_if_created();
  }

  status program(uint32_t ppn, uint32_t n_pages, const std::byte* src) noexcept override {
    // The command thread is the only writer, so one engine (single issuer) serves every program.
    return writer_->sync_io(io::io_op::kWrite, write_handle_, const_cast<std::byte*>(src), n_pages * p_.page_bytes,
                            uint64_t{ppn} * p_.page_bytes);
  }
  status erase_block(uint32_t) noexcept override {
    // NAND erase sets bits; the emulation leaves the old bytes (the FTL never reads an erased
    // page: the L2P entries of an erased block were invalidated first).
    return {};
  }
  status read(uint32_t ppn, std::byte* dst) noexcept override {
    return writer_->sync_io(io::io_op::kRead, write_handle_, dst, p_.page_bytes, uint64_t{ppn} * p_.page_bytes);
  }
  result<std::unique_ptr<page_reader>> make_reader(uint32_t depth) noexcept override {
    io::engine_options o;
    o.queue_depth = std::max<uint32_t>(depth, 4);
    o.staging_bytes = 0;  // reads land in the worker's own staging buffers
    auto e = io::uring_engine::create(o);
    if (!e.ok()) return e.error();
    auto h = e.value()->add_file(file_.fd);
    if (!h.ok()) return h.error();
    return std::unique_ptr<page_reader>(new (std::nothrow)
                                            uring_reader(std::move(e.value()), h.value(), p_.page_bytes));
  }
  status sync() noexcept override {
    if (::fdatasync(file_.fd) != 0) return errno_error(errno, "flash '" + file_.path + "': fdatasync");
    return {};
  }
  bool direct_io() const noexcept override { return file_.direct; }
  bool ram() const noexcept override { return false; }

 private:
  // One engine per worker thread: queue page reads, submit, wait for all.
  class uring_reader final : public page_reader {
   public:
    uring_reader(std::unique_ptr<io::uring_engine> e, uint32_t handle, uint32_t page_bytes)
        : eng_(std::move(e)), handle_(handle), page_bytes_(page_bytes), done_(eng_->queue_depth()) {}
    ~uring_reader() override { eng_->drain(); }
    status queue(uint32_t ppn, std::byte* dst) noexcept override {
      if (eng_->queued() + eng_->in_flight() >= eng_->queue_depth()) INSTINFER_TRY(reap(1));
      return eng_->queue(io::io_op::kRead, handle_, dst, page_bytes_, uint64_t{ppn} * page_bytes_, ppn);
    }
    status submit() noexcept override { return eng_->submit(); }
    status wait_all() noexcept override { return reap(eng_->queued() + eng_->in_flight()); }

   private:
    status reap(uint32_t n) noexcept {
      status first;
      while (n > 0) {
        auto got = eng_->wait(done_, n);
        if (!got.ok()) return got.error();
        for (uint32_t i = 0; i < got.value(); ++i) {
          status s = io::check_completion(done_[i], "flash page read");
          if (!s.ok() && first.ok()) first = std::move(s);
        }
        n -= std::min(n, got.value());
      }
      return first;
    }
    std::unique_ptr<io::uring_engine> eng_;
    uint32_t handle_;
    uint32_t page_bytes_;
    std::vector<io::completion> done_;
  };

  flash_params p_;
  io::storage_file file_;
  std::unique_ptr<io::uring_engine> writer_;
  uint32_t write_handle_;
  bool keep_;
};

// ---- injected faults (test seam) ----------------------------------------------------------------
class faulty_flash final : public flash_store {
 public:
  faulty_flash(std::unique_ptr<flash_store> inner, const flash_fault& f) : inner_(std::move(inner)), f_(f) {}

  status program(uint32_t ppn, uint32_t n_pages, const std::byte* src) noexcept override {
    if (hit(flash_fault::kind::kProgram)) return injected("program", ppn);
    return inner_->program(ppn, n_pages, src);
  }
  status erase_block(uint32_t first_ppn) noexcept override { return inner_->erase_block(first_ppn); }
  status read(uint32_t ppn, std::byte* dst) noexcept override {
    if (hit(flash_fault::kind::kRead)) return injected("read", ppn);
    return inner_->read(ppn, dst);
  }
  result<std::unique_ptr<page_reader>> make_reader(uint32_t depth) noexcept override {
    auto r = inner_->make_reader(depth);
    if (!r.ok()) return r.error();
    return std::unique_ptr<page_reader>(new (std::nothrow) faulty_reader(*this, std::move(*r)));
  }
  status sync() noexcept override { return inner_->sync(); }
  bool direct_io() const noexcept override { return inner_->direct_io(); }
  bool ram() const noexcept override { return inner_->ram(); }

 private:
  // A failed queued read completes with the error at wait_all, like a failed io_uring read.
  class faulty_reader final : public page_reader {
   public:
    faulty_reader(faulty_flash& f, std::unique_ptr<page_reader> inner) : f_(f), inner_(std::move(inner)) {}
    status queue(uint32_t ppn, std::byte* dst) noexcept override {
      if (f_.hit(flash_fault::kind::kRead)) {
        if (failed_.ok()) failed_ = injected("read", ppn);
        return {};
      }
      return inner_->queue(ppn, dst);
    }
    status submit() noexcept override { return inner_->submit(); }
    status wait_all() noexcept override {
      status s = inner_->wait_all();
      if (!failed_.ok()) s = std::move(failed_), failed_ = {};
      return s;
    }

   private:
    faulty_flash& f_;
    std::unique_ptr<page_reader> inner_;
    status failed_;
  };

  static status injected(const char* what, uint32_t ppn) {
    return {errc::kIoError, std::string("flash page ") + what + " of page " + std::to_string(ppn) +
                                ": injected fault (INSTINFER_CSD_FAULT): " + std::strerror(EIO)};
  }
  // Workers read concurrently: one counter per kind, atomically.
  bool hit(flash_fault::kind k) noexcept {
    if (f_.op != k) return false;
    const uint64_t i = ++count_;
    return i >= f_.nth && i - f_.nth < f_.count;
  }

  std::unique_ptr<flash_store> inner_;
  flash_fault f_;
  std::atomic<uint64_t> count_{0};
};

}  // namespace

std::unique_ptr<flash_store> make_faulty_flash(std::unique_ptr<flash_store> inner, const flash_fault& fault) {
  return std::make_unique<faulty_flash>(std::move(inner), fault);
}

std::unique_ptr<flash_store> make_ram_flash(const flash_params& p) {
  return std::make_unique<ram_flash>(p);
}

result<std::unique_ptr<flash_store>> make_file_flash(const flash_params& p, const flash_file_options& o) {
  auto f = o.fd >= 0 ? io::adopt_storage_file(o.fd, o.lock_fd, o.path, o.allow_buffered)
                     : io::open_storage_file(o.path, io::storage_open_options{true, o.allow_buffered, true});
  if (!f.ok()) return f.error();
  io::storage_file file = std::move(f.value());
  // A drive that does not start leaves no file it created behind.
  auto fail = [&](status s) -> result<std::unique_ptr<flash_store>> {
    file.remove_if_created();
    return s;
  };
  if (file.block_device) {
    if (file.size_bytes < p.capacity_bytes())
      return fail({errc::kNoSpace, "block device '" + o.path + "' is smaller than the flash (" +
                                       std::to_string(p.capacity_bytes()) + " bytes)"});
  } else if (file.size_bytes < p.capacity_bytes()) {
    if (::ftruncate(file.fd, static_cast<off_t>(p.capacity_bytes())) != 0)
      return fail(errno_error(errno, "size flash file '" + o.path + "'"));
  }
  if (file.direct && (p.page_bytes % file.offset_align != 0 || 4096 % file.mem_align != 0))
    return fail({errc::kUnsupported, "flash page " + std::to_string(p.page_bytes) +
                                         " is not a multiple of the device's direct-I/O alignment (" +
                                         std::to_string(file.offset_align) + ")"});
  io::engine_options eo;
  eo.queue_depth = 8;
  eo.staging_bytes = 0;
  auto e = io::uring_engine::create(eo);
  if (!e.ok()) return fail(e.error());
  auto h = e.value()->add_file(file.fd);
  if (!h.ok()) return fail(h.error());
  return std::unique_ptr<flash_store>(new file_flash(p, std::move(file), std::move(e.value()), h.value(), o.keep));
}

}  // namespace instinfer::csd
