// Reading and writing MixServe's files. Every reader validates and throws InputError naming the
// file, the key and the expected form; every writer writes a temp file and renames it.
#pragma once
#include <filesystem>
#include <string>
#include <vector>

#include "mixserve/core/cluster.hpp"
#include "mixserve/core/model.hpp"
#include "mixserve/core/plan.hpp"
#include "mixserve/core/profile.hpp"
#include "mixserve/core/workload.hpp"

namespace mixserve {

// Where shipped configs/ and profiles/ live: $MIXSERVE_DATA_DIR, else the source tree the binary
// was built from (compile-time), else <exe>/../share/mixserve.
std::filesystem::path data_dir();

// --model: a shipped name ("deepseek-r1"), a model YAML path, or a HF config.json path
// (a directory holding config.json also works).
ModelSpec load_model(const std::string& name_or_path);
ModelSpec parse_model_yaml(const std::string& text, const std::string& origin);
// Supported: DeepseekV2ForCausalLM, DeepseekV3ForCausalLM, Qwen3MoeForCausalLM,
// Qwen2MoeForCausalLM, MixtralForCausalLM, OlmoeForCausalLM, GptOssForCausalLM.
ModelSpec import_hf_config(const std::string& json_text, const std::string& origin);
std::vector<std::string> supported_hf_architectures();
std::vector<std::string> shipped_models();
std::string model_to_yaml(const ModelSpec& m);

ClusterSpec load_cluster(const std::string& name_or_path);
ClusterSpec parse_cluster_yaml(const std::string& text, const std::string& origin);
std::vector<std::string> shipped_clusters();
std::string cluster_to_yaml(const ClusterSpec& c);

HardwareProfile load_profile(const std::string& name_or_path);
HardwareProfile parse_profile_yaml(const std::string& text, const std::string& origin);
std::string profile_to_yaml(const HardwareProfile& p);

WorkloadSpec load_workload(const std::string& name_or_path);
WorkloadSpec parse_workload_yaml(const std::string& text, const std::string& origin);
std::string workload_to_yaml(const WorkloadSpec& w);

Plan load_plan(const std::string& path);
Plan parse_plan_yaml(const std::string& text, const std::string& origin);
std::string plan_to_yaml(const Plan& p);
// Semantic checks of a loaded plan (rank map consistent with layout and cluster, degrees
// powers of two and dividing the model). Throws InputError naming the key.
void validate_plan(const Plan& p, const std::string& origin);

// Files.
std::string read_text_file(const std::filesystem::path& p);        // InputError if unreadable
void write_file_atomic(const std::filesystem::path& p, const std::string& content);  // tmp+rename
std::string sha256_hex(const std::string& bytes);
std::string now_iso8601_utc();
Provenance make_provenance(const std::string& tool,
                           const std::vector<std::pair<std::string, std::string>>& input_texts);

inline constexpr const char* kMixServeVersion = "0.1.0";

}  // namespace mixserve
