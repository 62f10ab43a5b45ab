// The instinfer-csd command line: drive options, where the queue-pair region comes from, and the
// parent to die with.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "drive.hpp"
#include "instinfer/csd/queue_pair.hpp"

namespace instinfer::csd {

struct process_options {
  drive_options drive;
  int shm_fd = -1;   // --shm-fd: the region a host created and handed over
  std::string name;  // --name: create /dev/shm/instinfer-csd-NAME instead
  region_layout layout{1, 64, 16ull << 20};
  int64_t parent_pid = 0;
};

// The options, or the exit code to leave with (0 after --help, 2 after a usage error, printed).
std::optional<int> parse_process_options(int argc, char** argv, process_options& out);

}  // namespace instinfer::csd
