// mixserve-plan subcommands. main.cpp builds the CLI11 app, calls every register_* below, parses,
// runs the chosen subcommand and maps exceptions to exit codes (InputError -> 2, others -> 1).
// Each subcommand lives in its own planner/src/cmd_<name>.cpp.
#pragma once
#include <functional>
#include <CLI/CLI.hpp>

namespace mixserve::planner {

// A registered subcommand runs through this callback once CLI11 has parsed the options.
using CommandRunner = std::function<int()>;

// Each registers its subcommand on `app` and returns the runner that executes it.
CommandRunner register_describe(CLI::App& app);   // cmd_describe.cpp
CommandRunner register_search(CLI::App& app);     // cmd_search.cpp
CommandRunner register_check(CLI::App& app);      // cmd_check.cpp
CommandRunner register_simulate(CLI::App& app);   // cmd_simulate.cpp (serving simulator)
CommandRunner register_validate(CLI::App& app);   // cmd_validate.cpp (predicted vs measured)

}  // namespace mixserve::planner
