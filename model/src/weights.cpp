// Weight sets: Hugging Face tensor names and shapes, synthetic initialisation, safetensors I/O.
#include "mixserve/model/weights.hpp"

#include <fmt/format.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>

#include "mixserve/core/enum_names.hpp"
#include "mixserve/core/error.hpp"
#include "mixserve/core/io.hpp"
#include "mixserve/model/bf16.hpp"
#include "mixserve/model/safetensors.hpp"

namespace mixserve::model {
namespace fs = std::filesystem;
using json = nlohmann::json;

static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian; the loader copies it as is");

namespace {

constexpr auto kFamilyNames = MIXSERVE_ENUM_TABLE(Family, MIXSERVE_MODEL_FAMILIES);

std::string layer(int i) { return fmt::format("model.layers.{}.", i); }

const char* proj_suffix(FfnProj p) {
  switch (p) {
    case FfnProj::gate: return "gate_proj";
    case FfnProj::up: return "up_proj";
    case FfnProj::down: return "down_proj";
  }
  return "?";
}

// Mixtral's expert MLP: w1 = gate (silu branch), w3 = up, w2 = down.
const char* mixtral_proj(FfnProj p) {
  switch (p) {
    case FfnProj::gate: return "w1";
    case FfnProj::up: return "w3";
    case FfnProj::down: return "w2";
  }
  return "?";
}

[[noreturn]] void unsupported(const ModelSpec& m, const std::string& what) {
  throw InputError(fmt::format("model '{}' ({}): {} is not supported by the model module yet",
                               m.name, m.architecture, what));
}

// The model numbers the weight layout needs, checked once.
void check_spec(const ModelSpec& m, Family f) {
  const auto& a = m.attention;
  const auto& e = m.moe;
  auto need = [&](bool ok, const std::string& key, const std::string& expected, auto got) {
    if (!ok)
      throw InputError(fmt::format("model '{}': {}: expected {}, got {}", m.name, key, expected,
                                   got));
  };
  need(m.hidden_size > 0, "hidden_size", "> 0", m.hidden_size);
  need(m.vocab_size > 0, "vocab_size", "> 0", m.vocab_size);
  need(m.num_layers > 0, "num_layers", "> 0", m.num_layers);
  need(static_cast<int>(m.layers.size()) == m.num_layers, "layers",
       fmt::format("{} entries (num_layers)", m.num_layers), m.layers.size());
  if (a.type == AttentionType::mla) unsupported(m, "MLA attention");
  if (a.sinks) unsupported(m, "attention sinks");
  need(a.num_heads > 0 && a.num_kv_heads > 0 && a.num_heads % a.num_kv_heads == 0,
       "attention.num_kv_heads", "> 0 and dividing num_heads", a.num_kv_heads);
  need(a.head_dim > 0 && a.head_dim % 2 == 0, "attention.head_dim", "even and > 0 (RoPE)",
       a.head_dim);
  if (m.num_moe_layers() > 0) {
    if (e.scoring != Scoring::softmax) unsupported(m, "sigmoid routing");
    if (e.topk_before_softmax) unsupported(m, "top-k before softmax routing");
    if (e.router_bias || e.score_correction_bias) unsupported(m, "a router bias");
    if (e.expert_bias) unsupported(m, "expert biases");
    if (e.n_group != 1) unsupported(m, "group-limited routing");
    need(e.num_experts > 0, "moe.num_experts", "> 0", e.num_experts);
    need(e.top_k >= 1 && e.top_k <= e.num_experts, "moe.top_k", "in [1, num_experts]", e.top_k);
    need(e.expert_intermediate_size > 0, "moe.expert_intermediate_size", "> 0",
         e.expert_intermediate_size);
    if (e.shared_intermediate_size > 0 && f != Family::qwen2_moe)
      unsupported(m, "a shared expert outside Qwen2-MoE");
    if (e.shared_expert_gate && e.shared_intermediate_size <= 0)
      need(false, "moe.shared_intermediate_size", "> 0 with a shared expert gate",
           e.shared_intermediate_size);
  }
  if (m.num_dense_layers() > 0)
    need(m.dense_intermediate_size > 0, "dense_intermediate_size", "> 0 (dense layers exist)",
         m.dense_intermediate_size);
}

// splitmix64: a small, portable, seedable generator (the same numbers on every platform).
struct SplitMix {
  uint64_t s;
  uint64_t next() {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  double uniform_pm1() {  // U[-1, 1)
    return static_cast<double>(next() >> 11) * 0x1.0p-52 - 1.0;
  }
};

uint64_t fnv1a(std::string_view s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ull;
  return h;
}

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

// Layer index of "model.layers.{i}.…", -1 for other names.
int layer_of(std::string_view name) {
  constexpr std::string_view p = "model.layers.";
  if (name.substr(0, p.size()) != p) return -1;
  int i = 0;
  size_t k = p.size();
  if (k >= name.size() || name[k] < '0' || name[k] > '9') return -1;
  for (; k < name.size() && name[k] >= '0' && name[k] <= '9'; ++k) i = i * 10 + (name[k] - '0');
  return k < name.size() && name[k] == '.' ? i : -1;
}

}  // namespace

std::string_view to_string(Family f) { return enum_to_string(kFamilyNames, f); }

Family family_of(const ModelSpec& m) {
  if (const auto f = enum_parse(kFamilyNames, m.architecture)) return *f;
  throw InputError(fmt::format("model '{}': architecture '{}' has no weight layout here: "
                               "expected one of {}",
                               m.name, m.architecture, enum_names_joined(kFamilyNames)));
}

namespace names {
std::string embed() { return "model.embed_tokens.weight"; }
std::string final_norm() { return "model.norm.weight"; }
std::string lm_head() { return "lm_head.weight"; }
std::string input_norm(int i) { return layer(i) + "input_layernorm.weight"; }
std::string post_attn_norm(int i) { return layer(i) + "post_attention_layernorm.weight"; }
std::string attn(int i, std::string_view what, std::string_view suffix) {
  return fmt::format("{}self_attn.{}.{}", layer(i), what, suffix);
}
std::string router(Family f, int i) {
  return layer(i) + (f == Family::mixtral ? "block_sparse_moe.gate.weight" : "mlp.gate.weight");
}
std::string expert(Family f, int i, int e, FfnProj p) {
  if (f == Family::mixtral)
    return fmt::format("{}block_sparse_moe.experts.{}.{}.weight", layer(i), e, mixtral_proj(p));
  return fmt::format("{}mlp.experts.{}.{}.weight", layer(i), e, proj_suffix(p));
}
std::string shared_expert(int i, FfnProj p) {
  return fmt::format("{}mlp.shared_expert.{}.weight", layer(i), proj_suffix(p));
}
std::string shared_expert_gate(int i) { return layer(i) + "mlp.shared_expert_gate.weight"; }
std::string dense(int i, FfnProj p) {
  return fmt::format("{}mlp.{}.weight", layer(i), proj_suffix(p));
}
}  // namespace names

int64_t TensorSpec::numel() const { return shape_numel(shape); }
int64_t Tensor::numel() const { return shape_numel(shape); }

std::vector<TensorSpec> expected_tensors(const ModelSpec& m) {
  const Family f = family_of(m);
  check_spec(m, f);
  const int64_t h = m.hidden_size;
  const auto& a = m.attention;
  const auto& e = m.moe;
  const int64_t q = int64_t{a.num_heads} * a.head_dim;
  const int64_t kv = int64_t{a.num_kv_heads} * a.head_dim;
  std::vector<TensorSpec> out;
  auto add = [&](std::string name, std::vector<int64_t> shape) {
    out.push_back({std::move(name), std::move(shape)});
  };
  auto add_ffn = [&](auto name_of, int64_t width) {
    add(name_of(FfnProj::gate), {width, h});
    add(name_of(FfnProj::up), {width, h});
    add(name_of(FfnProj::down), {h, width});
  };
  add(names::embed(), {m.vocab_size, h});
  for (int i = 0; i < m.num_layers; ++i) {
    add(names::input_norm(i), {h});
    add(names::attn(i, "q_proj"), {q, h});
    add(names::attn(i, "k_proj"), {kv, h});
    add(names::attn(i, "v_proj"), {kv, h});
    if (a.qkv_bias) {
      add(names::attn(i, "q_proj", "bias"), {q});
      add(names::attn(i, "k_proj", "bias"), {kv});
      add(names::attn(i, "v_proj", "bias"), {kv});
    }
    add(names::attn(i, "o_proj"), {h, q});
    if (a.o_bias) add(names::attn(i, "o_proj", "bias"), {h});
    if (a.qk_norm) {
      // OLMoE normalises the whole projected q and k; Qwen3 each head (one head_dim weight).
      const bool full = f == Family::olmoe;
      add(names::attn(i, "q_norm"), {full ? q : a.head_dim});
      add(names::attn(i, "k_norm"), {full ? kv : a.head_dim});
    }
    add(names::post_attn_norm(i), {h});
    if (m.layers[static_cast<size_t>(i)].moe) {
      add(names::router(f, i), {e.num_experts, h});
      for (int x = 0; x < e.num_experts; ++x)
        add_ffn([&](FfnProj p) { return names::expert(f, i, x, p); }, e.expert_intermediate_size);
      if (e.shared_intermediate_size > 0) {
        add_ffn([&](FfnProj p) { return names::shared_expert(i, p); }, e.shared_intermediate_size);
        if (e.shared_expert_gate) add(names::shared_expert_gate(i), {1, h});
      }
    } else {
      add_ffn([&](FfnProj p) { return names::dense(i, p); }, m.dense_intermediate_size);
    }
  }
  add(names::final_norm(), {h});
  if (!m.tie_word_embeddings) add(names::lm_head(), {m.vocab_size, h});
  return out;
}

ModelSpec with_num_layers(const ModelSpec& m, int n) {
  if (n < 1 || n > m.num_layers)
    throw InputError(fmt::format("--num-layers: expected an integer in [1, {}] for model '{}', "
                                 "got {}",
                                 m.num_layers, m.name, n));
  ModelSpec out = m;
  out.num_layers = n;
  out.layers.resize(static_cast<size_t>(n));
  return out;
}

WeightSet::WeightSet(ModelSpec spec) : spec_(std::move(spec)), family_(family_of(spec_)) {
  for (auto& t : expected_tensors(spec_)) {
    index_.emplace(t.name, tensors_.size());
    const auto n = static_cast<size_t>(t.numel());
    tensors_.push_back({std::move(t.name), std::move(t.shape), std::vector<uint16_t>(n, 0)});
  }
}

const Tensor* WeightSet::find(std::string_view name) const {
  const auto it = index_.find(std::string(name));
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

const Tensor& WeightSet::at(std::string_view name) const {
  const Tensor* t = find(name);
  if (!t)
    throw RuntimeError(fmt::format("weight set of '{}' has no tensor '{}'", spec_.name, name));
  return *t;
}

Tensor& WeightSet::at(std::string_view name) {
  return const_cast<Tensor&>(static_cast<const WeightSet&>(*this).at(name));
}

int64_t WeightSet::total_elements() const {
  int64_t n = 0;
  for (const auto& t : tensors_) n += t.numel();
  return n;
}

WeightSet synthetic_weights(const ModelSpec& m, uint64_t seed) {
  WeightSet w(m);
  std::vector<std::string> all;
  for (const auto& t : w.tensors()) all.push_back(t.name);
  for (const auto& name : all) {
    Tensor& t = w.at(name);
    SplitMix rng{seed ^ fnv1a(name)};
    double offset = 0.0, scale = 0.0;
    if (ends_with(name, "norm.weight") || ends_with(name, "layernorm.weight")) {
      offset = 1.0;
      scale = 0.1;
    } else if (ends_with(name, ".bias")) {
      scale = 0.1;
    } else if (name == names::embed()) {
      scale = std::sqrt(3.0);  // U(-a, a) has variance a^2/3: unit variance
    } else {
      scale = std::sqrt(3.0 / static_cast<double>(t.shape.back()));  // variance 1/fan_in
    }
    for (auto& v : t.bf16)
      v = f32_to_bf16(static_cast<float>(offset + scale * rng.uniform_pm1()));
  }
  return w;
}

namespace {

// Where each tensor of a checkpoint lives: one file or the shards of an index.
struct Checkpoint {
  std::string origin;  // the path the user gave, for messages about the set as a whole
  std::vector<std::unique_ptr<SafetensorsFile>> files;
  struct Loc {
    const SafetensorsFile* file;
    const StTensorInfo* info;
  };
  std::vector<std::pair<std::string, Loc>> tensors;  // file order, then offset order
};

Checkpoint open_index(const fs::path& index) {
  Checkpoint c;
  c.origin = index.string();
  json j;
  try {
    j = json::parse(read_text_file(index));
  } catch (const json::parse_error& e) {
    throw InputError(fmt::format("{}: malformed JSON at byte {}: {}", c.origin, e.byte, e.what()));
  }
  if (!j.is_object() || !j.contains("weight_map") || !j.at("weight_map").is_object())
    throw InputError(fmt::format("{}: key 'weight_map': expected an object of tensor name -> "
                                 "shard file name",
                                 c.origin));
  std::map<std::string, const SafetensorsFile*> shards;
  std::map<const SafetensorsFile*, std::set<std::string>> listed;
  for (const auto& [name, v] : j.at("weight_map").items()) {
    if (!v.is_string())
      throw InputError(fmt::format("{}: weight_map['{}']: expected a shard file name, got {}",
                                   c.origin, name, v.dump()));
    const std::string shard = v.get<std::string>();
    auto it = shards.find(shard);
    if (it == shards.end()) {
      const fs::path p = index.parent_path() / shard;
      if (shard.find('/') != std::string::npos || !fs::is_regular_file(p))
        throw InputError(fmt::format("{}: weight_map['{}'] names shard '{}', which is not a file "
                                     "next to the index",
                                     c.origin, name, shard));
      c.files.push_back(std::make_unique<SafetensorsFile>(p));
      it = shards.emplace(shard, c.files.back().get()).first;
    }
    if (!it->second->find(name))
      throw InputError(fmt::format("{}: weight_map says tensor '{}' is in '{}', which does not "
                                   "hold it",
                                   c.origin, name, shard));
    listed[it->second].insert(name);
  }
  for (const auto& f : c.files) {
    for (const auto& t : f->tensors()) {
      if (!listed[f.get()].count(t.name))
        throw InputError(fmt::format("{}: tensor '{}' is not listed for this shard in {}",
                                     f->path().string(), t.name, c.origin));
      c.tensors.push_back({t.name, {f.get(), &t}});
    }
  }
  return c;
}

Checkpoint open_checkpoint(const fs::path& path) {
  if (fs::is_directory(path)) {
    if (fs::is_regular_file(path / "model.safetensors.index.json"))
      return open_index(path / "model.safetensors.index.json");
    if (fs::is_regular_file(path / "model.safetensors")) return open_checkpoint(path / "model.safetensors");
    throw InputError(fmt::format("{}: expected model.safetensors or model.safetensors.index.json "
                                 "in this directory",
                                 path.string()));
  }
  if (!fs::exists(path))
    throw InputError(fmt::format("{}: no such weight file or directory", path.string()));
  if (path.extension() == ".json") return open_index(path);
  Checkpoint c;
  c.origin = path.string();
  c.files.push_back(std::make_unique<SafetensorsFile>(path));
  for (const auto& t : c.files.back()->tensors()) c.tensors.push_back({t.name, {c.files.back().get(), &t}});
  return c;
}

}  // namespace

WeightSet load_weights(const ModelSpec& full, const fs::path& path, int num_layers) {
  const ModelSpec m = num_layers > 0 ? with_num_layers(full, num_layers) : full;
  WeightSet w(m);
  const Checkpoint c = open_checkpoint(path);
  const std::string arch = m.architecture;

  // A checkpoint of another model shares no tensor name with this one (or only a few generic
  // ones): say so instead of listing hundreds of missing tensors.
  size_t known = 0;
  for (const auto& [name, loc] : c.tensors) known += w.find(name) ? 1 : 0;
  if (known == 0)
    throw InputError(fmt::format(
        "{}: none of its {} tensors belongs to a {} checkpoint (first: '{}', expected e.g. "
        "'{}'): weights of another model?",
        c.origin, c.tensors.size(), arch, c.tensors.empty() ? "" : c.tensors.front().first,
        names::attn(0, "q_proj")));

  // Our writer records the architecture; Hugging Face checkpoints carry only {"format": "pt"}.
  for (const auto& f : c.files) {
    const auto it = f->metadata().find("architecture");
    if (it != f->metadata().end() && it->second != arch)
      throw InputError(fmt::format("{}: __metadata__.architecture: expected {}, got {} (weights "
                                   "of another model)",
                                   f->path().string(), arch, it->second));
  }

  std::set<std::string> seen;
  for (const auto& [name, loc] : c.tensors) {
    const std::string file = loc.file->path().string();
    const int l = layer_of(name);
    if (num_layers > 0 && l >= m.num_layers && l < full.num_layers) continue;  // not loaded
    const Tensor* t = w.find(name);
    if (!t)
      throw InputError(fmt::format("{}: unexpected tensor '{}': not part of a {} checkpoint with "
                                   "{} layers (weights of another model or configuration?)",
                                   file, name, arch, full.num_layers));
    const StDType dt = loc.info->dtype;
    if (dt != StDType::bf16 && dt != StDType::f16 && dt != StDType::f32)
      throw InputError(fmt::format("{}: {}: expected dtype BF16, F16 or F32, got {}", file, name,
                                   to_string(dt)));
    if (loc.info->shape != t->shape)
      throw InputError(fmt::format("{}: {}: expected shape {}, got {}", file, name,
                                   shape_string(t->shape), shape_string(loc.info->shape)));
    if (!seen.insert(name).second)
      throw InputError(fmt::format("{}: tensor '{}' appears twice in the checkpoint", file, name));
  }
  for (const auto& t : w.tensors())
    if (!seen.count(t.name))
      throw InputError(fmt::format("{}: missing tensor '{}' (expected shape {})", c.origin,
                                   t.name, shape_string(t.shape)));

  for (const auto& [name, loc] : c.tensors) {
    if (!seen.count(name)) continue;
    Tensor& t = w.at(name);
    const std::vector<uint8_t> bytes = loc.file->read(*loc.info);
    const size_t n = t.bf16.size();
    switch (loc.info->dtype) {
      case StDType::bf16:
        std::memcpy(t.bf16.data(), bytes.data(), n * 2);
        break;
      case StDType::f16:
        for (size_t i = 0; i < n; ++i) {
          uint16_t h;
          std::memcpy(&h, bytes.data() + 2 * i, 2);
          t.bf16[i] = f32_to_bf16(f16_to_f32(h));
        }
        break;
      default: {  // f32 (checked above)
        for (size_t i = 0; i < n; ++i) {
          float f;
          std::memcpy(&f, bytes.data() + 4 * i, 4);
          t.bf16[i] = f32_to_bf16(f);
        }
      }
    }
  }
  return w;
}

namespace {

StTensorData to_st(const Tensor& t) {
  StTensorData d{t.name, StDType::bf16, t.shape, std::vector<uint8_t>(t.bf16.size() * 2)};
  std::memcpy(d.bytes.data(), t.bf16.data(), d.bytes.size());
  return d;
}

std::map<std::string, std::string> file_metadata(const WeightSet& w) {
  return {{"format", "pt"}, {"architecture", w.spec().architecture}};
}

}  // namespace

void save_weights(const WeightSet& w, const fs::path& file) {
  std::vector<StTensorData> all;
  for (const auto& t : w.tensors()) all.push_back(to_st(t));
  write_safetensors(file, all, file_metadata(w));
}

void save_weights_sharded(const WeightSet& w, const fs::path& dir, uint64_t max_shard_bytes) {
  std::vector<std::vector<const Tensor*>> shards(1);
  uint64_t in_shard = 0, total = 0;
  for (const auto& t : w.tensors()) {
    const uint64_t bytes = t.bf16.size() * 2;
    if (in_shard > 0 && in_shard + bytes > max_shard_bytes) {
      shards.emplace_back();
      in_shard = 0;
    }
    shards.back().push_back(&t);
    in_shard += bytes;
    total += bytes;
  }
  std::map<std::string, std::string> weight_map;
  for (size_t s = 0; s < shards.size(); ++s) {
    const std::string name =
        fmt::format("model-{:05d}-of-{:05d}.safetensors", s + 1, shards.size());
    std::vector<StTensorData> data;
    for (const Tensor* t : shards[s]) {
      data.push_back(to_st(*t));
      weight_map[t->name] = name;
    }
    write_safetensors(dir / name, data, file_metadata(w));
  }
  write_safetensors_index(dir / "model.safetensors.index.json", weight_map, total);
}

}  // namespace mixserve::model
