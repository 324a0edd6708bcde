// Weight sets: names and shapes against core's independent parameter count, bf16 conversions,
// synthetic initialisation, safetensors load/save and the loader's validation messages.
#include <doctest/doctest.h>
#include <fmt/format.h>

#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

#include "mixserve/core/error.hpp"
#include "mixserve/model/bf16.hpp"
#include "mixserve/model/safetensors.hpp"
#include "mixserve/model/weights.hpp"
#include "tiny_models.hpp"

using namespace mixserve;
using namespace mixserve::model;
using namespace mixserve::model::test;

namespace {

template <class F>
std::string input_error(F&& f) {
  try {
    f();
  } catch (const InputError& e) {
    return e.what();
  }
  FAIL("expected an InputError");
  return "";
}

bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

// The weight set as safetensors tensors, with `edit` applied to the list before writing.
template <class Edit>
void write_edited(const WeightSet& w, const std::filesystem::path& p, Edit edit) {
  std::vector<StTensorData> all;
  for (const auto& t : w.tensors()) {
    StTensorData d{t.name, StDType::bf16, t.shape, std::vector<uint8_t>(t.bf16.size() * 2)};
    std::memcpy(d.bytes.data(), t.bf16.data(), d.bytes.size());
    all.push_back(std::move(d));
  }
  edit(all);
  write_safetensors(p, all, {{"format", "pt"}});
}

StTensorData& find_st(std::vector<StTensorData>& all, const std::string& name) {
  for (auto& t : all)
    if (t.name == name) return t;
  FAIL("no tensor " << name);
  return all.front();
}

}  // namespace

TEST_CASE("bf16: round to nearest even, exact widening, NaN and infinities") {
  CHECK(f32_to_bf16(1.0f) == 0x3f80);
  CHECK(f32_to_bf16(-2.0f) == 0xc000);
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1.0).
  CHECK(f32_to_bf16(1.0f + std::ldexp(1.0f, -8)) == 0x3f80);
  // 1 + 3 * 2^-8 is halfway between 0x3f81 and 0x3f82: even is 0x3f82.
  CHECK(f32_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)) == 0x3f82);
  // Just above the halfway point rounds up.
  CHECK(f32_to_bf16(1.0f + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20)) == 0x3f81);
  CHECK(bf16_to_f32(0x3f81) == 1.0f + std::ldexp(1.0f, -7));
  CHECK(std::isnan(bf16_to_f32(f32_to_bf16(std::numeric_limits<float>::quiet_NaN()))));
  CHECK(std::isinf(bf16_to_f32(f32_to_bf16(std::numeric_limits<float>::infinity()))));
  // The largest float rounds up to infinity (as IEEE round-to-nearest does).
  CHECK(std::isinf(bf16_to_f32(f32_to_bf16(std::numeric_limits<float>::max()))));
  // Every bf16 value survives the round trip.
  int wrong = 0;
  for (uint32_t b = 0; b < 0x10000; ++b) {
    const float f = bf16_to_f32(static_cast<uint16_t>(b));
    if (!std::isnan(f) && f32_to_bf16(f) != b) ++wrong;
  }
  CHECK(wrong == 0);
}

TEST_CASE("f16: exact widening of normals, subnormals, zero and infinities") {
  CHECK(f16_to_f32(0x3c00) == 1.0f);
  CHECK(f16_to_f32(0xc000) == -2.0f);
  CHECK(f16_to_f32(0x7bff) == 65504.0f);
  CHECK(f16_to_f32(0x0001) == std::ldexp(1.0f, -24));  // smallest subnormal
  CHECK(f16_to_f32(0x03ff) == std::ldexp(1023.0f, -24));  // largest subnormal
  CHECK(f16_to_f32(0x0400) == std::ldexp(1.0f, -14));  // smallest normal
  CHECK(f16_to_f32(0x8000) == 0.0f);
  CHECK(std::signbit(f16_to_f32(0x8000)));
  CHECK(std::isinf(f16_to_f32(0xfc00)));
  CHECK(std::isnan(f16_to_f32(0x7e00)));
}

TEST_CASE("expected tensors: the sum of the shapes equals core's count_params (independent)") {
  for (const ModelSpec& m : tiny_models()) {
    CAPTURE(m.architecture);
    int64_t sum = 0;
    std::set<std::string> seen;
    for (const auto& t : expected_tensors(m)) {
      sum += t.numel();
      CHECK(seen.insert(t.name).second);  // names are unique
    }
    CHECK(sum == count_params(m).total());
    // And for the first-N-layers model.
    ModelSpec biased = m;  // attention_bias: q, k, v and o biases
    biased.attention.qkv_bias = biased.attention.o_bias = true;
    int64_t sum_b = 0;
    for (const auto& t : expected_tensors(biased)) sum_b += t.numel();
    CHECK(sum_b == count_params(biased).total());
    const ModelSpec one = with_num_layers(m, 1);
    int64_t sum1 = 0;
    for (const auto& t : expected_tensors(one)) sum1 += t.numel();
    CHECK(sum1 == count_params(one).total());
  }
  // The shipped full-size configs too (names only; nothing is allocated).
  for (const char* name : {"qwen3-30b-a3b", "qwen3-235b-a22b", "mixtral-8x7b", "olmoe-1b-7b",
                           "qwen2-57b-a14b"}) {
    CAPTURE(name);
    const ModelSpec m = load_model(name);
    int64_t sum = 0;
    for (const auto& t : expected_tensors(m)) sum += t.numel();
    CHECK(sum == count_params(m).total());
  }
}

TEST_CASE("expected tensors: Hugging Face names and shapes per architecture") {
  auto shape_of = [](const ModelSpec& m, const std::string& name) {
    for (const auto& t : expected_tensors(m))
      if (t.name == name) return t.shape;
    return std::vector<int64_t>{-1};
  };
  const ModelSpec q3 = tiny_qwen3();
  CHECK(shape_of(q3, "model.embed_tokens.weight") == std::vector<int64_t>{37, 16});
  CHECK(shape_of(q3, "model.layers.1.self_attn.q_proj.weight") == std::vector<int64_t>{32, 16});
  CHECK(shape_of(q3, "model.layers.1.self_attn.k_proj.weight") == std::vector<int64_t>{16, 16});
  CHECK(shape_of(q3, "model.layers.1.self_attn.o_proj.weight") == std::vector<int64_t>{16, 32});
  CHECK(shape_of(q3, "model.layers.1.self_attn.q_norm.weight") == std::vector<int64_t>{8});
  CHECK(shape_of(q3, "model.layers.1.self_attn.k_norm.weight") == std::vector<int64_t>{8});
  CHECK(shape_of(q3, "model.layers.1.mlp.gate.weight") == std::vector<int64_t>{6, 16});
  CHECK(shape_of(q3, "model.layers.2.mlp.experts.5.down_proj.weight") == std::vector<int64_t>{16, 12});
  CHECK(shape_of(q3, "model.layers.0.mlp.gate_proj.weight") == std::vector<int64_t>{24, 16});
  CHECK(shape_of(q3, "model.layers.0.mlp.gate.weight") == std::vector<int64_t>{-1});  // dense
  CHECK(shape_of(q3, "lm_head.weight") == std::vector<int64_t>{37, 16});
  CHECK(shape_of(q3, "model.norm.weight") == std::vector<int64_t>{16});

  const ModelSpec q2 = tiny_qwen2();
  CHECK(shape_of(q2, "model.layers.0.self_attn.q_proj.bias") == std::vector<int64_t>{16});
  CHECK(shape_of(q2, "model.layers.0.self_attn.o_proj.bias") == std::vector<int64_t>{-1});
  CHECK(shape_of(q2, "model.layers.1.mlp.shared_expert.up_proj.weight") == std::vector<int64_t>{20, 16});
  CHECK(shape_of(q2, "model.layers.1.mlp.shared_expert_gate.weight") == std::vector<int64_t>{1, 16});
  CHECK(shape_of(q2, "lm_head.weight") == std::vector<int64_t>{-1});  // tied

  const ModelSpec mx = tiny_mixtral();
  CHECK(shape_of(mx, "model.layers.1.block_sparse_moe.gate.weight") == std::vector<int64_t>{4, 16});
  CHECK(shape_of(mx, "model.layers.1.block_sparse_moe.experts.3.w1.weight") == std::vector<int64_t>{12, 16});
  CHECK(shape_of(mx, "model.layers.1.block_sparse_moe.experts.3.w3.weight") == std::vector<int64_t>{12, 16});
  CHECK(shape_of(mx, "model.layers.1.block_sparse_moe.experts.3.w2.weight") == std::vector<int64_t>{16, 12});
  CHECK(shape_of(mx, "model.layers.0.self_attn.q_norm.weight") == std::vector<int64_t>{-1});

  const ModelSpec ol = tiny_olmoe();
  CHECK(shape_of(ol, "model.layers.0.self_attn.q_norm.weight") == std::vector<int64_t>{16});
  CHECK(shape_of(ol, "model.layers.0.self_attn.k_norm.weight") == std::vector<int64_t>{16});
  CHECK(shape_of(ol, "model.layers.1.mlp.experts.7.gate_proj.weight") == std::vector<int64_t>{8, 16});
}

TEST_CASE("expected tensors: architectures outside the family are rejected by name") {
  ModelSpec ds = load_model("deepseek-v3");
  const auto msg = input_error([&] { expected_tensors(ds); });
  CHECK(contains(msg, "DeepseekV3ForCausalLM"));
  CHECK(contains(msg, "Qwen3MoeForCausalLM"));
  ModelSpec m = tiny_mixtral();
  m.moe.scoring = Scoring::sigmoid;
  CHECK(contains(input_error([&] { expected_tensors(m); }), "sigmoid routing"));
  CHECK(contains(input_error([&] { with_num_layers(tiny_mixtral(), 3); }), "[1, 2]"));
  CHECK(contains(input_error([&] { with_num_layers(tiny_mixtral(), 0); }), "--num-layers"));
}

TEST_CASE("families: each architecture name maps to its family and back") {
  for (const ModelSpec& m : tiny_models()) {
    CAPTURE(m.architecture);
    CHECK(to_string(family_of(m)) == m.architecture);
  }
  ModelSpec m = tiny_olmoe();
  m.architecture = "OlmoeForCausalLMX";
  const auto msg = input_error([&] { family_of(m); });
  CHECK(contains(msg, "expected one of Qwen3MoeForCausalLM, Qwen2MoeForCausalLM, "
                      "MixtralForCausalLM, OlmoeForCausalLM"));
}

TEST_CASE("synthetic weights: seeded, per-tensor streams, realistic scales") {
  const ModelSpec m = tiny_qwen3();
  const WeightSet a = synthetic_weights(m, 7);
  const WeightSet b = synthetic_weights(m, 7);
  const WeightSet c = synthetic_weights(m, 8);
  const WeightSet first2 = synthetic_weights(with_num_layers(m, 2), 7);
  CHECK(a.total_elements() == count_params(m).total());
  for (const auto& t : a.tensors()) {
    CAPTURE(t.name);
    CHECK(t.bf16 == b.at(t.name).bf16);
    if (t.numel() > 4) CHECK(t.bf16 != c.at(t.name).bf16);
    if (const Tensor* p = first2.find(t.name)) CHECK(p->bf16 == t.bf16);  // prefix property
    double sum = 0.0, sq = 0.0;
    for (uint16_t v : t.bf16) {
      const double x = bf16_to_f32(v);
      sum += x;
      sq += x * x;
    }
    const double n = double(t.numel());
    if (t.name.find("norm.weight") != std::string::npos) {
      CHECK(sum / n == doctest::Approx(1.0).epsilon(0.1));  // norm weights near 1
      CHECK(sq / n - (sum / n) * (sum / n) < 0.01);         // 1 + U(-0.1, 0.1)
    } else if (t.shape.size() == 2 && t.name != "model.embed_tokens.weight" && n >= 64) {
      // Variance 1/fan_in: fan_in * E[x^2] is 1 within sampling noise (>= 64 draws, so the
      // relative spread of the estimate is below ~0.2; 0.45 leaves room).
      CHECK(sq / n * double(t.shape[1]) == doctest::Approx(1.0).epsilon(0.45));
    }
  }
  CHECK(first2.find("model.layers.2.input_layernorm.weight") == nullptr);
}

TEST_CASE("weights: save and load round trip (one file and sharded), F32/F16 rounded to bf16") {
  TempDir dir("weights");
  for (const ModelSpec& m : tiny_models()) {
    CAPTURE(m.architecture);
    const WeightSet w = synthetic_weights(m, 11);
    save_weights(w, dir.path / "model.safetensors");
    const WeightSet r = load_weights(m, dir.path / "model.safetensors");
    for (const auto& t : w.tensors()) CHECK(r.at(t.name).bf16 == t.bf16);
    // Sharded, loaded through the directory (the index is preferred).
    save_weights_sharded(w, dir.path, 4096);
    int shards = 0;
    for (const auto& e : std::filesystem::directory_iterator(dir.path))
      shards += e.path().filename().string().rfind("model-0", 0) == 0 ? 1 : 0;
    CHECK(shards > 1);
    const WeightSet s = load_weights(m, dir.path);
    for (const auto& t : w.tensors()) CHECK(s.at(t.name).bf16 == t.bf16);
    for (const auto& e : std::filesystem::directory_iterator(dir.path)) std::filesystem::remove(e);
  }

  // F32 and F16 files are rounded to bf16 on load.
  const ModelSpec m = tiny_mixtral();
  const WeightSet w = synthetic_weights(m, 3);
  const std::string name = "model.layers.0.self_attn.q_proj.weight";
  const float probe = 1.0f + 3 * std::ldexp(1.0f, -8);  // a tie: rounds to even (0x3f82)
  write_edited(w, dir.path / "f32.safetensors", [&](std::vector<StTensorData>& all) {
    StTensorData& t = find_st(all, name);
    std::vector<uint8_t> bytes(t.bytes.size() * 2);
    for (size_t i = 0; i < t.bytes.size() / 2; ++i) {
      uint16_t b;
      std::memcpy(&b, t.bytes.data() + 2 * i, 2);
      const float f = i == 0 ? probe : bf16_to_f32(b);
      std::memcpy(bytes.data() + 4 * i, &f, 4);
    }
    t.dtype = StDType::f32;
    t.bytes = bytes;
  });
  const WeightSet r32 = load_weights(m, dir.path / "f32.safetensors");
  CHECK(r32.at(name).bf16[0] == 0x3f82);
  CHECK(std::equal(r32.at(name).bf16.begin() + 1, r32.at(name).bf16.end(),
                   w.at(name).bf16.begin() + 1));
  write_edited(w, dir.path / "f16.safetensors", [&](std::vector<StTensorData>& all) {
    StTensorData& t = find_st(all, name);
    t.dtype = StDType::f16;
    for (size_t i = 0; i < t.bytes.size() / 2; ++i) {
      const uint16_t h = i % 2 ? 0x3c00 : 0xc000;  // 1.0, -2.0: exact in bf16
      std::memcpy(t.bytes.data() + 2 * i, &h, 2);
    }
  });
  const WeightSet r16 = load_weights(m, dir.path / "f16.safetensors");
  CHECK(r16.at(name).bf16[0] == 0xc000);
  CHECK(r16.at(name).bf16[1] == 0x3f80);
}

TEST_CASE("weights: --num-layers loads the first N layers and skips the rest") {
  TempDir dir("num-layers");
  const ModelSpec m = tiny_qwen3();  // 3 layers
  const WeightSet w = synthetic_weights(m, 5);
  save_weights(w, dir.path / "model.safetensors");
  const WeightSet two = load_weights(m, dir.path / "model.safetensors", 2);
  CHECK(two.spec().num_layers == 2);
  CHECK(two.find("model.layers.2.input_layernorm.weight") == nullptr);
  for (const auto& t : two.tensors()) CHECK(t.bf16 == w.at(t.name).bf16);
  CHECK_THROWS_AS(load_weights(m, dir.path / "model.safetensors", 4), InputError);
}

TEST_CASE("weights: mismatched checkpoints give InputErrors naming the file and the tensor") {
  TempDir dir("mismatch");
  const ModelSpec m = tiny_qwen3();
  const WeightSet w = synthetic_weights(m, 1);
  const auto p = dir.path / "ckpt.safetensors";
  const std::string file = p.string();

  SUBCASE("wrong shape") {
    write_edited(w, p, [](std::vector<StTensorData>& all) {
      StTensorData& t = find_st(all, "model.layers.1.mlp.gate.weight");
      t.shape = {5, 16};
      t.bytes.resize(5 * 16 * 2);
    });
    const auto msg = input_error([&] { load_weights(m, p); });
    CHECK(contains(msg, file));
    CHECK(contains(msg, "model.layers.1.mlp.gate.weight: expected shape [6, 16], got [5, 16]"));
  }
  SUBCASE("wrong dtype") {
    write_edited(w, p, [](std::vector<StTensorData>& all) {
      StTensorData& t = find_st(all, "model.norm.weight");
      t.dtype = StDType::i16;
    });
    const auto msg = input_error([&] { load_weights(m, p); });
    CHECK(contains(msg, file));
    CHECK(contains(msg, "model.norm.weight"));
    CHECK(contains(msg, "expected dtype BF16, F16 or F32, got I16"));
  }
  SUBCASE("missing tensor") {
    write_edited(w, p, [](std::vector<StTensorData>& all) {
      std::erase_if(all, [](const StTensorData& t) {
        return t.name == "model.layers.2.mlp.experts.4.up_proj.weight";
      });
    });
    const auto msg = input_error([&] { load_weights(m, p); });
    CHECK(contains(msg, file));
    CHECK(contains(msg, "missing tensor 'model.layers.2.mlp.experts.4.up_proj.weight'"));
  }
  SUBCASE("unexpected tensor") {
    write_edited(w, p, [](std::vector<StTensorData>& all) {
      all.push_back({"model.layers.1.mlp.experts.6.up_proj.weight", StDType::bf16, {12, 16},
                     std::vector<uint8_t>(12 * 16 * 2)});
    });
    const auto msg = input_error([&] { load_weights(m, p); });
    CHECK(contains(msg, file));
    CHECK(contains(msg, "unexpected tensor 'model.layers.1.mlp.experts.6.up_proj.weight'"));
  }
  SUBCASE("a checkpoint of another model (no shared names)") {
    write_safetensors(p, {{"transformer.wte.weight", StDType::bf16, {2, 2}, std::vector<uint8_t>(8)}});
    const auto msg = input_error([&] { load_weights(m, p); });
    CHECK(contains(msg, file));
    CHECK(contains(msg, "transformer.wte.weight"));
    CHECK(contains(msg, "another model"));
  }
  SUBCASE("a checkpoint of another architecture (our metadata)") {
    save_weights(synthetic_weights(tiny_mixtral(), 1), p);
    const auto msg = input_error([&] { load_weights(m, p); });
    CHECK(contains(msg, file));
    CHECK(contains(msg, "MixtralForCausalLM"));
  }
  SUBCASE("a Mixtral checkpoint without metadata, loaded as Qwen3") {
    const WeightSet mx = synthetic_weights(tiny_mixtral(), 1);
    std::vector<StTensorData> all;
    for (const auto& t : mx.tensors())
      all.push_back({t.name, StDType::bf16, t.shape, std::vector<uint8_t>(t.bf16.size() * 2)});
    write_safetensors(p, all);
    const auto msg = input_error([&] { load_weights(m, p); });
    CHECK(contains(msg, file));
    CHECK(contains(msg, "model."));  // names the first offending tensor
  }
  SUBCASE("a corrupt file") {
    save_weights(w, p);
    std::filesystem::resize_file(p, std::filesystem::file_size(p) - 1);
    const auto msg = input_error([&] { load_weights(m, p); });
    CHECK(contains(msg, file));
    CHECK(contains(msg, "lm_head.weight"));  // the last tensor runs past the end
  }
  SUBCASE("no weights at the path") {
    CHECK(contains(input_error([&] { load_weights(m, dir.path / "none"); }), "none"));
    CHECK(contains(input_error([&] { load_weights(m, dir.path); }), "model.safetensors"));
  }
}

TEST_CASE("weights: sharded index errors name the index, the shard and the tensor") {
  TempDir dir("index");
  const ModelSpec m = tiny_mixtral();
  const WeightSet w = synthetic_weights(m, 2);
  save_weights_sharded(w, dir.path, 2048);
  const auto index = dir.path / "model.safetensors.index.json";
  const std::string first_shard = "model-00001-of-";

  SUBCASE("the index names a shard that is not there") {
    std::string shard;
    for (const auto& e : std::filesystem::directory_iterator(dir.path))
      if (e.path().filename().string().rfind(first_shard, 0) == 0) shard = e.path().filename().string();
    REQUIRE(!shard.empty());
    std::filesystem::remove(dir.path / shard);
    const auto msg = input_error([&] { load_weights(m, dir.path); });
    CHECK(contains(msg, index.string()));
    CHECK(contains(msg, shard));
  }
  SUBCASE("a shard holds a tensor the index does not list") {
    auto j = nlohmann::json::parse(read_text_file(index));
    REQUIRE(j["weight_map"].erase("model.norm.weight") == 1);
    write_file_atomic(index, j.dump(2));
    const auto msg = input_error([&] { load_weights(m, dir.path); });
    CHECK(contains(msg, index.string()));
    CHECK(contains(msg, "'model.norm.weight' is not listed"));
  }
  SUBCASE("the index puts a tensor in a shard that does not hold it") {
    auto j = nlohmann::json::parse(read_text_file(index));
    auto& map = j["weight_map"];
    const std::string home = map["model.embed_tokens.weight"];
    std::string other;
    for (const auto& [name, shard] : map.items())
      if (shard.get<std::string>() != home) other = shard.get<std::string>();
    REQUIRE(!other.empty());
    map["model.embed_tokens.weight"] = other;
    write_file_atomic(index, j.dump(2));
    const auto msg = input_error([&] { load_weights(m, dir.path); });
    CHECK(contains(msg, index.string()));
    CHECK(contains(msg, "model.embed_tokens.weight"));
    CHECK(contains(msg, "does not hold it"));
  }
}
