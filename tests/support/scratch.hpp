// Scratch directories and the O_DIRECT probe shared by the tests that put ssd: and csd: files
// on the real disk ($TMPDIR or /tmp).
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <cstdlib>
#include <string>

namespace test_support {

// A fresh directory "<$TMPDIR or /tmp>/<prefix>-XXXXXX"; empty when it cannot be made.
inline std::string make_scratch_dir(const std::string& prefix) {
  const char* t = std::getenv("TMPDIR");
  std::string tmpl = std::string((t && *t) ? t : "/tmp") + "/" + prefix + "-XXXXXX";
  return ::mkdtemp(tmpl.data()) ? tmpl : std::string{};
}

// Whether files in `dir` can be opened with O_DIRECT (tmpfs and some overlays refuse it).
inline bool direct_io_works(const std::string& dir) {
  const std::string p = dir + "/probe-direct";
  const int fd = ::open(p.c_str(), O_RDWR | O_CREAT | O_DIRECT | O_CLOEXEC, 0600);
  if (fd < 0) return false;
  ::close(fd);
  ::unlink(p.c_str());
  return true;
}

}  // namespace test_support
