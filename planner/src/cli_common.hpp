// Options and input loading shared by the mixserve-plan subcommands (private to planner/src).
#pragma once
#include <string>
#include <utility>
#include <vector>

#include <CLI/CLI.hpp>

#include "mixserve/planner/search.hpp"

namespace mixserve::planner {

struct InputOptions {
  std::string model, cluster, profile, workload;
  int64_t input_len = 0, output_len = 0;  // 0 = the workload's
  double rate = 0;                        // 0 = the workload's
  int max_batch = 0;                      // 0 = the workload's, else 256
  int64_t max_model_len = 0;              // 0 = the workload's max_seq_len, else the model's
  std::string routing;                    // "" = the workload's
};

// --model/--cluster/--profile/--workload and the workload overrides.
void add_input_options(CLI::App& sub, InputOptions& o);

struct LoadedInputs {
  SearchInputs in;
  // (what was named, canonical text) of every input, for the plan's provenance hashes.
  std::vector<std::pair<std::string, std::string>> texts;
};
// Loads and applies the overrides; InputError names the option or file at fault.
LoadedInputs load_inputs(const InputOptions& o);

// "uniform" | "zipf:<s>"; InputError naming `key` otherwise.
sim::RoutingModel parse_routing(const std::string& s, const std::string& key);

// "costs: datasheet estimates (profile NAME: source datasheet)" or "" for a measured profile.
std::string datasheet_note(const HardwareProfile& p);

double to_gib(double bytes);

// CLI11 check: a finite number > 0, with a one-line message ("expected a number > 0, got '0'").
const CLI::Validator& positive();

}  // namespace mixserve::planner
