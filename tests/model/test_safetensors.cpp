// safetensors reader/writer: round trip and every structural corruption gives an InputError
// naming the file (and the tensor where there is one).
#include <doctest/doctest.h>

#include <fstream>
#include <string>

#include "mixserve/core/error.hpp"
#include "mixserve/model/safetensors.hpp"
#include "tiny_models.hpp"

using namespace mixserve;
using namespace mixserve::model;
using mixserve::model::test::TempDir;

namespace {

std::vector<uint8_t> iota_bytes(size_t n, uint8_t start) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>(start + i);
  return v;
}

std::string slurp(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void dump(const std::filesystem::path& p, const std::string& s) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(s.data(), static_cast<std::streamsize>(s.size()));
}

// A raw file with the given JSON header and data bytes (no padding, no validation).
void raw_file(const std::filesystem::path& p, const std::string& header, size_t data_bytes) {
  std::string s;
  for (int i = 0; i < 8; ++i) s.push_back(static_cast<char>((header.size() >> (8 * i)) & 0xff));
  s += header;
  s.append(data_bytes, '\x01');
  dump(p, s);
}

// The InputError's message (fails the test when nothing or something else is thrown).
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

}  // namespace

TEST_CASE("safetensors: write then read round-trips names, dtypes, shapes, bytes, metadata") {
  TempDir dir("st-roundtrip");
  const auto path = dir.path / "a.safetensors";
  const std::vector<StTensorData> in = {
      {"b.weight", StDType::bf16, {3, 5}, iota_bytes(30, 7)},
      {"a.bias", StDType::f32, {3}, iota_bytes(12, 100)},
      {"scalar", StDType::f16, {}, iota_bytes(2, 200)},
      {"empty", StDType::bf16, {0, 4}, {}},
  };
  write_safetensors(path, in, {{"format", "pt"}});
  const std::string raw = slurp(path);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | static_cast<uint8_t>(raw[size_t(i)]);
  CHECK((8 + header_len) % 8 == 0);  // the writer pads the header to 8 bytes
  CHECK(raw.size() == 8 + header_len + 30 + 12 + 2);

  const SafetensorsFile f(path);
  CHECK(f.tensors().size() == in.size());
  CHECK(f.metadata().at("format") == "pt");
  for (const auto& t : in) {
    const StTensorInfo* info = f.find(t.name);
    REQUIRE(info != nullptr);
    CHECK(info->dtype == t.dtype);
    CHECK(info->shape == t.shape);
    CHECK(f.read(*info) == t.bytes);
  }
  CHECK(f.find("missing") == nullptr);
}

TEST_CASE("safetensors: dtype table") {
  for (const char* name : {"BF16", "F16", "F32", "F64", "I64", "U8", "BOOL", "F8_E4M3"}) {
    const auto d = parse_st_dtype(name);
    REQUIRE(d.has_value());
    CHECK(to_string(*d) == name);
  }
  CHECK(st_dtype_bytes(StDType::bf16) == 2);
  CHECK(st_dtype_bytes(StDType::f32) == 4);
  CHECK(st_dtype_bytes(StDType::i64) == 8);
  CHECK_FALSE(parse_st_dtype("bfloat16").has_value());
  CHECK(shape_string({128, 2048}) == "[128, 2048]");
}

TEST_CASE("safetensors: corrupt files give InputErrors naming the file and the tensor") {
  TempDir dir("st-corrupt");
  const auto good = dir.path / "good.safetensors";
  write_safetensors(good, {{"x.weight", StDType::bf16, {2, 4}, iota_bytes(16, 1)},
                           {"y.weight", StDType::bf16, {4}, iota_bytes(8, 50)}});
  const std::string raw = slurp(good);
  const auto bad = dir.path / "bad.safetensors";
  const std::string bad_name = bad.string();

  SUBCASE("shorter than the 8-byte length") {
    dump(bad, raw.substr(0, 5));
    const auto msg = input_error([&] { SafetensorsFile{bad}; });
    CHECK(msg.find(bad_name) != std::string::npos);
    CHECK(msg.find("truncated") != std::string::npos);
  }
  SUBCASE("data cut short: the last tensor runs past the end") {
    dump(bad, raw.substr(0, raw.size() - 3));
    const auto msg = input_error([&] { SafetensorsFile{bad}; });
    CHECK(msg.find(bad_name) != std::string::npos);
    CHECK(msg.find("'y.weight'") != std::string::npos);
    CHECK(msg.find("past the end") != std::string::npos);
  }
  SUBCASE("header length past the end of the file") {
    std::string s = raw;
    s[0] = '\xff';
    s[1] = '\xff';
    s[2] = '\x7f';
    dump(bad, s);
    const auto msg = input_error([&] { SafetensorsFile{bad}; });
    CHECK(msg.find(bad_name) != std::string::npos);
    CHECK(msg.find("header length") != std::string::npos);
  }
  SUBCASE("header is not JSON") {
    raw_file(bad, "{\"x\": [1, 2", 0);
    const auto msg = input_error([&] { SafetensorsFile{bad}; });
    CHECK(msg.find(bad_name) != std::string::npos);
    CHECK(msg.find("JSON") != std::string::npos);
  }
  SUBCASE("overlapping tensors") {
    raw_file(bad,
             R"({"p":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
             R"("q":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
             12);
    const auto msg = input_error([&] { SafetensorsFile{bad}; });
    CHECK(msg.find(bad_name) != std::string::npos);
    CHECK(msg.find("'p'") != std::string::npos);
    CHECK(msg.find("'q'") != std::string::npos);
    CHECK(msg.find("overlap") != std::string::npos);
  }
  SUBCASE("offsets out of range") {
    raw_file(bad, R"({"p":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8);
    const auto msg = input_error([&] { SafetensorsFile{bad}; });
    CHECK(msg.find("'p'") != std::string::npos);
    CHECK(msg.find("past the end") != std::string::npos);
  }
  SUBCASE("offsets that do not match dtype x shape") {
    raw_file(bad, R"({"p":{"dtype":"BF16","shape":[4],"data_offsets":[0,4]}})", 8);
    const auto msg = input_error([&] { SafetensorsFile{bad}; });
    CHECK(msg.find("'p'") != std::string::npos);
    CHECK(msg.find("needs 8") != std::string::npos);
  }
  SUBCASE("end before begin") {
    raw_file(bad, R"({"p":{"dtype":"BF16","shape":[0],"data_offsets":[4,0]}})", 8);
    const auto msg = input_error([&] { SafetensorsFile{bad}; });
    CHECK(msg.find("'p'") != std::string::npos);
    CHECK(msg.find("data_offsets") != std::string::npos);
  }
  SUBCASE("unknown dtype") {
    raw_file(bad, R"({"p":{"dtype":"Q4","shape":[4],"data_offsets":[0,4]}})", 4);
    const auto msg = input_error([&] { SafetensorsFile{bad}; });
    CHECK(msg.find("'p'") != std::string::npos);
    CHECK(msg.find("Q4") != std::string::npos);
  }
  SUBCASE("negative shape") {
    raw_file(bad, R"({"p":{"dtype":"U8","shape":[-4],"data_offsets":[0,4]}})", 4);
    const auto msg = input_error([&] { SafetensorsFile{bad}; });
    CHECK(msg.find("'p'") != std::string::npos);
    CHECK(msg.find("shape") != std::string::npos);
  }
  SUBCASE("no such file") {
    const auto msg = input_error([&] { SafetensorsFile{dir.path / "nope.safetensors"}; });
    CHECK(msg.find("nope.safetensors") != std::string::npos);
  }
}

TEST_CASE("safetensors: the writer rejects duplicate names and size mismatches") {
  TempDir dir("st-writer");
  const auto p = dir.path / "w.safetensors";
  CHECK_THROWS_AS(write_safetensors(p, {{"a", StDType::f32, {2}, iota_bytes(8, 0)},
                                        {"a", StDType::f32, {2}, iota_bytes(8, 0)}}),
                  InputError);
  CHECK_THROWS_AS(write_safetensors(p, {{"a", StDType::f32, {3}, iota_bytes(8, 0)}}), InputError);
  CHECK_FALSE(std::filesystem::exists(p));
}
