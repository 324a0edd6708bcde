// mixserve-plan: parse options, run one subcommand, map errors to exit codes (STYLE.md §1):
// bad input or usage -> one line on stderr, exit 2; anything else -> exit 1.
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "mixserve/core/error.hpp"
#include "mixserve/core/io.hpp"
#include "mixserve/planner/cli.hpp"

namespace {

// With --json, errors also go to stdout as one JSON document so scripts always get one.
void report_error(bool json, int code, const std::string& msg) {
  std::fprintf(stderr, "mixserve-plan: %s\n", msg.c_str());
  if (json) {
    const nlohmann::json doc{{"ok", false}, {"exit_code", code}, {"error", msg}};
    std::printf("%s\n", doc.dump(2).c_str());
  }
}

std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

}  // namespace

int main(int argc, char** argv) {
  using namespace mixserve;
  bool json = false;
  for (int i = 1; i < argc; ++i) json = json || std::strcmp(argv[i], "--json") == 0;

  CLI::App app{"mixserve-plan: choose the parallel layout of an MoE model on a GPU cluster"};
  app.set_version_flag("--version", std::string("mixserve-plan ") + kMixServeVersion);
  app.require_subcommand(1, 1);
  std::vector<std::pair<std::string, planner::CommandRunner>> commands = {
      {"describe", planner::register_describe(app)},
      {"search", planner::register_search(app)},
      {"check", planner::register_check(app)},
      {"simulate", planner::register_simulate(app)},
      {"validate", planner::register_validate(app)},
  };
  try {
    app.parse(argc, argv);
  } catch (const CLI::Success& e) {
    return app.exit(e);  // --help, --version
  } catch (const CLI::ParseError& e) {
    report_error(json, kExitInput, first_line(e.what()) + " (run with --help for usage)");
    return kExitInput;
  }
  try {
    for (auto& [name, run] : commands)
      if (app.got_subcommand(name)) return run();
    report_error(json, kExitInput, "no subcommand (describe, search, check, simulate, validate)");
    return kExitInput;
  } catch (const InputError& e) {
    report_error(json, kExitInput, first_line(e.what()));
    return kExitInput;
  } catch (const std::exception& e) {
    report_error(json, kExitRuntime, first_line(e.what()));
    return kExitRuntime;
  }
}
