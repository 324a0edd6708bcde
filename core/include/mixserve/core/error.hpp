// Error types shared by every MixServe library and the one place exit codes are decided.
// Library code throws; only main() catches (STYLE.md §1, §10).
#pragma once
#include <stdexcept>
#include <string>

namespace mixserve {

// Exit codes of every CLI: 0 ok, 1 runtime failure (GPU, NCCL, I/O), 2 bad input or usage.
inline constexpr int kExitOk = 0;
inline constexpr int kExitRuntime = 1;
inline constexpr int kExitInput = 2;

// Bad user input: malformed file, missing key, wrong form, unsupported architecture,
// a layout that does not fit. The message names the file, the key and the expected form.
class InputError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Everything else that goes wrong at run time (device errors, failed writes).
class RuntimeError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// "<file>: key '<key>': expected <expected>, got <got>"
[[noreturn]] void throw_input_error(const std::string& file, const std::string& key,
                                    const std::string& expected, const std::string& got = "");

}  // namespace mixserve
