// safetensors reader and writer (format summary in safetensors.hpp).
#include "mixserve/model/safetensors.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

#include "mixserve/core/error.hpp"
#include "mixserve/core/io.hpp"

namespace mixserve::model {
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

struct StDTypeRow {
  StDType d;
  const char* name;
  int64_t bytes;
};
constexpr StDTypeRow kStDTypes[] = {
#define MIXSERVE_X(e, s, b) {StDType::e, s, b},
    MIXSERVE_ST_DTYPES(MIXSERVE_X)
#undef MIXSERVE_X
};

// The reference implementation caps the header at 100 MiB; a larger length is a corrupt file.
constexpr uint64_t kMaxHeaderBytes = uint64_t{100} << 20;

std::string st_dtype_names() {
  std::string s;
  for (const auto& r : kStDTypes) s += (s.empty() ? "" : ", ") + std::string(r.name);
  return s;
}

}  // namespace

std::string_view to_string(StDType d) {
  for (const auto& r : kStDTypes)
    if (r.d == d) return r.name;
  return "?";
}

std::optional<StDType> parse_st_dtype(std::string_view s) {
  for (const auto& r : kStDTypes)
    if (s == r.name) return r.d;
  return std::nullopt;
}

int64_t st_dtype_bytes(StDType d) {
  for (const auto& r : kStDTypes)
    if (r.d == d) return r.bytes;
  return 0;
}

std::string shape_string(const std::vector<int64_t>& shape) {
  return fmt::format("[{}]", fmt::join(shape, ", "));
}

int64_t shape_numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

SafetensorsFile::SafetensorsFile(fs::path path) : path_(std::move(path)) {
  const std::string file = path_.string();
  std::ifstream in(path_, std::ios::binary);
  if (!in) throw InputError(fmt::format("{}: cannot open safetensors file", file));
  std::error_code ec;
  const uint64_t size = fs::file_size(path_, ec);
  if (ec) throw InputError(fmt::format("{}: cannot stat: {}", file, ec.message()));
  if (size < 8)
    throw InputError(fmt::format(
        "{}: truncated: {} bytes, a safetensors file starts with an 8-byte header length", file,
        size));
  unsigned char len_bytes[8];
  in.read(reinterpret_cast<char*>(len_bytes), 8);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | len_bytes[i];
  if (header_len > size - 8)
    throw InputError(fmt::format(
        "{}: header length {} runs past the end of the file ({} bytes): truncated or not a "
        "safetensors file",
        file, header_len, size));
  if (header_len > kMaxHeaderBytes)
    throw InputError(fmt::format("{}: header length {} exceeds the format's limit of {} bytes",
                                 file, header_len, kMaxHeaderBytes));
  std::string header(header_len, '\0');
  in.read(header.data(), static_cast<std::streamsize>(header_len));
  if (!in) throw InputError(fmt::format("{}: cannot read the {}-byte header", file, header_len));
  data_start_ = 8 + header_len;
  const uint64_t data_size = size - data_start_;

  json j;
  try {
    j = json::parse(header);
  } catch (const json::parse_error& e) {
    throw InputError(fmt::format("{}: header is not valid JSON (byte {}): {}", file, e.byte,
                                 e.what()));
  }
  if (!j.is_object())
    throw InputError(fmt::format("{}: header: expected a JSON object, got {}", file,
                                 j.type_name()));
  for (const auto& [name, v] : j.items()) {
    if (name == "__metadata__") {
      if (!v.is_object())
        throw InputError(fmt::format("{}: __metadata__: expected an object of strings", file));
      for (const auto& [k, mv] : v.items()) {
        if (!mv.is_string())
          throw InputError(fmt::format("{}: __metadata__.{}: expected a string, got {}", file, k,
                                       mv.dump()));
        metadata_[k] = mv.get<std::string>();
      }
      continue;
    }
    auto bad = [&](const std::string& key, const std::string& expected) {
      throw InputError(fmt::format("{}: tensor '{}': {}: expected {}, got {}", file, name, key,
                                   expected, v.contains(key) ? v.at(key).dump() : "nothing"));
    };
    if (!v.is_object()) bad("entry", "an object with dtype, shape and data_offsets");
    if (!v.contains("dtype") || !v.at("dtype").is_string()) bad("dtype", "a dtype name");
    const auto dt = parse_st_dtype(v.at("dtype").get<std::string>());
    if (!dt) bad("dtype", "one of " + st_dtype_names());
    StTensorInfo t;
    t.name = name;
    t.dtype = *dt;
    if (!v.contains("shape") || !v.at("shape").is_array()) bad("shape", "a list of integers >= 0");
    for (const auto& d : v.at("shape")) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0) bad("shape", "a list of integers >= 0");
      t.shape.push_back(d.get<int64_t>());
    }
    const json* off = v.contains("data_offsets") ? &v.at("data_offsets") : nullptr;
    if (!off || !off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() ||
        !(*off)[1].is_number_unsigned())
      bad("data_offsets", "[begin, end] with 0 <= begin <= end");
    t.begin = (*off)[0].get<uint64_t>();
    t.end = (*off)[1].get<uint64_t>();
    if (t.end < t.begin) bad("data_offsets", "[begin, end] with 0 <= begin <= end");
    if (t.end > data_size)
      throw InputError(fmt::format(
          "{}: tensor '{}': data_offsets [{}, {}] run past the end of the data section ({} "
          "bytes): truncated file?",
          file, name, t.begin, t.end, data_size));
    const uint64_t need = static_cast<uint64_t>(shape_numel(t.shape) * st_dtype_bytes(t.dtype));
    if (t.end - t.begin != need)
      throw InputError(fmt::format(
          "{}: tensor '{}': data_offsets [{}, {}] span {} bytes, dtype {} shape {} needs {}", file,
          name, t.begin, t.end, t.end - t.begin, to_string(t.dtype), shape_string(t.shape),
          need));
    tensors_.push_back(std::move(t));
  }
  std::sort(tensors_.begin(), tensors_.end(), [](const StTensorInfo& a, const StTensorInfo& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  for (size_t i = 1; i < tensors_.size(); ++i) {
    const auto& a = tensors_[i - 1];
    const auto& b = tensors_[i];
    if (b.begin < a.end)
      throw InputError(fmt::format(
          "{}: tensors '{}' (bytes [{}, {})) and '{}' (bytes [{}, {})) overlap", file, a.name,
          a.begin, a.end, b.name, b.begin, b.end));
  }
  for (size_t i = 0; i < tensors_.size(); ++i) by_name_.emplace(tensors_[i].name, i);
}

const StTensorInfo* SafetensorsFile::find(std::string_view name) const {
  const auto it = by_name_.find(std::string(name));
  return it == by_name_.end() ? nullptr : &tensors_[it->second];
}

std::vector<uint8_t> SafetensorsFile::read(const StTensorInfo& t) const {
  std::ifstream in(path_, std::ios::binary);
  std::vector<uint8_t> out(t.end - t.begin);
  if (in) {
    in.seekg(static_cast<std::streamoff>(data_start_ + t.begin));
    in.read(reinterpret_cast<char*>(out.data()), static_cast<std::streamsize>(out.size()));
  }
  if (!in)
    throw InputError(fmt::format("{}: tensor '{}': cannot read bytes [{}, {}) of the data "
                                 "(file changed or truncated after opening?)",
                                 path_.string(), t.name, t.begin, t.end));
  return out;
}

void write_safetensors(const fs::path& path, const std::vector<StTensorData>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  std::set<std::string> names;
  for (const auto& t : tensors) {
    if (t.name == "__metadata__" || !names.insert(t.name).second)
      throw InputError(fmt::format("{}: tensor name '{}' is reserved or used twice",
                                   path.string(), t.name));
    const uint64_t need = static_cast<uint64_t>(shape_numel(t.shape) * st_dtype_bytes(t.dtype));
    if (t.bytes.size() != need)
      throw InputError(fmt::format("{}: tensor '{}': {} bytes given, dtype {} shape {} needs {}",
                                   path.string(), t.name, t.bytes.size(), to_string(t.dtype),
                                   shape_string(t.shape), need));
    header[t.name] = {{"dtype", std::string(to_string(t.dtype))},
                      {"shape", t.shape},
                      {"data_offsets", {offset, offset + need}}};
    offset += need;
  }
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');
  std::string content;
  content.reserve(8 + h.size() + offset);
  for (int i = 0; i < 8; ++i) content.push_back(static_cast<char>((h.size() >> (8 * i)) & 0xff));
  content += h;
  for (const auto& t : tensors)
    content.append(reinterpret_cast<const char*>(t.bytes.data()), t.bytes.size());
  write_file_atomic(path, content);
}

void write_safetensors_index(const fs::path& path,
                             const std::map<std::string, std::string>& weight_map,
                             uint64_t total_size_bytes) {
  const json j = {{"metadata", {{"total_size", total_size_bytes}}}, {"weight_map", weight_map}};
  write_file_atomic(path, j.dump(2) + "\n");
}

}  // namespace mixserve::model
