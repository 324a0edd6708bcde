// Shared by the tests that run the built mixserve-plan binary (test_cli.cpp, test_validate.cpp):
// a scratch folder per test process, file read/write, and one run of the CLI with its exit code,
// stdout and stderr.
#pragma once
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

namespace mixserve::test {

struct CliRun {
  int code = -1;
  std::string out, err;
};

// <tmp>/<tag>-<pid>, created once per process.
inline std::filesystem::path cli_scratch(const std::string& tag) {
  static const std::filesystem::path dir = [&] {
    std::filesystem::path d =
        std::filesystem::temp_directory_path() / (tag + "-" + std::to_string(static_cast<long>(::getpid())));
    std::filesystem::create_directories(d);
    return d;
  }();
  return dir;
}

inline std::string slurp(const std::filesystem::path& p) {
  std::ifstream f(p);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

inline void spit(const std::filesystem::path& p, const std::string& text) {
  std::ofstream f(p);
  f << text;
}

// Runs `<exe> <args>` through the shell, stdout and stderr into files of `dir`.
inline CliRun run_cli(const std::string& exe, const std::string& args, const std::filesystem::path& dir) {
  const std::filesystem::path out = dir / "stdout.txt", err = dir / "stderr.txt";
  const std::string cmd = "'" + exe + "' " + args + " > '" + out.string() + "' 2> '" + err.string() + "'";
  const int status = std::system(cmd.c_str());
  CliRun r;
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  r.out = slurp(out);
  r.err = slurp(err);
  return r;
}

}  // namespace mixserve::test
