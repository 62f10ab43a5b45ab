#include "queue_server.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <new>
#include <thread>

namespace instinfer::csd {

namespace {

bool process_alive(int32_t pid) noexcept {
  return pid > 0 && (::kill(pid, 0) == 0 || errno == EPERM);
}

constexpr uint64_t kOwnerCheckEvery = 1024;  // polls between checks that clients are alive
constexpr uint64_t kSpinsBeforeSleep = 2000;
constexpr int64_t kSleepNs = 50'000'000;  // wake to check clients and signals

}  // namespace

// ---- shared_region ------------------------------------------------------------------------------
result<shared_region> shared_region::create_named(const std::string& name, const region_layout& layout) {
  shared_region r;
  r.layout_ = layout;
  r.shm_name_ = "/instinfer-csd-" + name;
  r.fd_ = ::shm_open(r.shm_name_.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
  if (r.fd_ < 0) {
    const std::string why = std::strerror(errno);
    r.shm_name_.clear();  // not ours: do not unlink it
    return status{errc::kIoError, "shm_open /instinfer-csd-" + name + ": " + why};
  }
  if (::ftruncate(r.fd_, static_cast<off_t>(layout.total_bytes())) != 0)
    return status{errc::kOutOfMemory, std::string("cannot size shared memory: ") + std::strerror(errno)};
  void* map = ::mmap(nullptr, layout.total_bytes(), PROT_READ | PROT_WRITE, MAP_SHARED, r.fd_, 0);
  if (map == MAP_FAILED) return status{errc::kOutOfMemory, std::string("mmap: ") + std::strerror(errno)};
  r.base_ = static_cast<std::byte*>(map);
  return r;
}

result<shared_region> shared_region::map_fd(int fd, const region_layout& layout) {
  struct stat st {};
  if (::fstat(fd, &st) != 0 || static_cast<uint64_t>(st.st_size) < layout.total_bytes())
    return status{errc::kInvalidArgument,
                  "shared memory fd " + std::to_string(fd) + " is missing or smaller than the layout"};
  void* map = ::mmap(nullptr, layout.total_bytes(), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (map == MAP_FAILED) return status{errc::kOutOfMemory, std::string("mmap: ") + std::strerror(errno)};
  shared_region r;
  r.layout_ = layout;
  r.base_ = static_cast<std::byte*>(map);
  return r;
}

shared_region::shared_region(shared_region&& o) noexcept
    : base_(o.base_), layout_(o.layout_), shm_name_(std::move(o.shm_name_)), fd_(o.fd_) {
  o.base_ = nullptr;
  o.shm_name_.clear();
  o.fd_ = -1;
}

shared_region::~shared_region() {
  if (base_) ::munmap(base_, layout_.total_bytes());
  if (fd_ >= 0) ::close(fd_);
  if (!shm_name_.empty()) ::shm_unlink(shm_name_.c_str());
}

// ---- queue_server -------------------------------------------------------------------------------
queue_server::queue_server(drive& dev, std::byte* region, const region_layout& layout, bool fresh_queue_pairs) noexcept
    : dev_(dev), base_(region), layout_(layout), header_(new (region) region_header()) {
  for (uint32_t q = 0; q < layout_.n_queue_pairs; ++q) {
    qp_view v = qp_view::at(base_, layout_, q);
    if (fresh_queue_pairs) new (v.control) qp_control();
    qps_.push_back(v);
    known_generation_.push_back(v.control->generation.load());
  }
}

void queue_server::publish() noexcept {
  header_->version = kProtocolVersion;
  header_->n_queue_pairs = layout_.n_queue_pairs;
  header_->depth = layout_.depth;
  header_->data_bytes = layout_.data_bytes;
  header_->qp_stride = layout_.qp_stride();
  header_->total_bytes = layout_.total_bytes();
  header_->device_pid.store(static_cast<int32_t>(::getpid()));
  header_->magic = kRegionMagic;
  header_->device_ready.store(1, std::memory_order_release);
}

void queue_server::complete(qp_view& v, const sq_entry& e, const command_outcome& r) noexcept {
  if (r.cqe.status != 0) {
    error_record& er = v.errors[e.cid % layout_.depth];
    er.cid = e.cid;
    er.status = r.cqe.status;
    std::snprintf(er.text, sizeof er.text, "%s", r.error.c_str());
  }
  const uint32_t ct = v.control->cq_tail.load(std::memory_order_relaxed);
  v.cq[ct % layout_.depth] = r.cqe;
  v.control->cq_tail.store(ct + 1, std::memory_order_seq_cst);
  if (v.control->host_waiting.load(std::memory_order_seq_cst)) futex_wake_all(&v.control->cq_tail);
}

bool queue_server::serve_queue_pair(uint32_t q, qp_view& v) noexcept {
  bool worked = false;
  uint32_t head = v.control->sq_head.load(std::memory_order_relaxed);
  const uint32_t tail = v.control->sq_tail.load(std::memory_order_acquire);
  if (tail - head > layout_.depth) {  // a corrupt doorbell: drop what is there, keep serving
    v.control->sq_head.store(tail, std::memory_order_release);
    return false;
  }
  while (head != tail) {
    if (v.control->cq_tail.load(std::memory_order_relaxed) - v.control->cq_head.load(std::memory_order_acquire) >=
        layout_.depth)
      break;                                        // the host has not consumed completions: no room
    const sq_entry e = v.sq[head % layout_.depth];  // snapshot: the host cannot change it under us
    const command_outcome r = dev_.execute(q, e, v.data, v.data_bytes);
    ++head;
    v.control->sq_head.store(head, std::memory_order_release);
    complete(v, e, r);
    worked = true;
    if (r.shutdown) {
      shutdown_ = true;
      break;
    }
  }
  return worked;
}

bool queue_server::poll() noexcept {
  bool worked = false;
  header_->heartbeat.fetch_add(1, std::memory_order_relaxed);
  for (uint32_t q = 0; q < layout_.n_queue_pairs && !shutdown_; ++q) {
    qp_view& v = qps_[q];
    const int32_t owner = v.control->owner_pid.load(std::memory_order_acquire);
    const uint32_t gen = v.control->generation.load(std::memory_order_acquire);
    if (gen != known_generation_[q]) {  // a new client claimed the queue pair: forget the old one's namespaces
      dev_.drop_queue_pair(q);
      known_generation_[q] = gen;
    }
    if (owner == 0) continue;
    if (loops_ % kOwnerCheckEvery == 0 && !process_alive(owner)) {  // the client died without releasing
      dev_.drop_queue_pair(q);
      v.control->owner_pid.store(0, std::memory_order_release);
      continue;
    }
    worked |= serve_queue_pair(q, v);
  }
  ++loops_;
  return worked;
}

void queue_server::sleep_until_doorbell() noexcept {
  header_->device_sleeping.store(1, std::memory_order_seq_cst);
  const uint32_t bell = header_->doorbell.load(std::memory_order_seq_cst);
  bool pending = false;
  for (const qp_view& v : qps_)
    if (v.control->owner_pid.load() != 0 && v.control->sq_tail.load() != v.control->sq_head.load()) pending = true;
  if (!pending) futex_wait(&header_->doorbell, bell, kSleepNs);
  header_->device_sleeping.store(0, std::memory_order_seq_cst);
  loops_ = 0;  // check owners after a sleep
}

void queue_server::serve(const std::atomic<bool>& stop) noexcept {
  uint64_t idle_spins = 0;
  while (!stop.load(std::memory_order_relaxed) && !shutdown_) {
    if (poll()) {
      idle_spins = 0;
      continue;
    }
    if (++idle_spins < kSpinsBeforeSleep) {
      std::this_thread::yield();
      continue;
    }
    sleep_until_doorbell();
  }
}

void queue_server::close() noexcept {
  header_->device_ready.store(2, std::memory_order_release);
  for (const qp_view& v : qps_) futex_wake_all(&v.control->cq_tail);
}

}  // namespace instinfer::csd
