// safetensors files: read (header validated, tensor data read on demand) and write.
// Format: an 8-byte little-endian header length N, N bytes of JSON
// {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}},
// then the raw little-endian data; offsets are relative to the start of the data section.
// A sharded checkpoint adds model.safetensors.index.json: {"metadata": {...},
// "weight_map": {tensor name: shard file name}}.
// Every error is an InputError naming the file and, where there is one, the tensor.
#pragma once
#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace mixserve::model {

// X(enum, name in the header, bytes per element): the dtypes of the safetensors format.
#define MIXSERVE_ST_DTYPES(X)                                                                \
  X(boolean, "BOOL", 1) X(u8, "U8", 1) X(i8, "I8", 1) X(f8_e4m3, "F8_E4M3", 1)              \
  X(f8_e5m2, "F8_E5M2", 1) X(i16, "I16", 2) X(u16, "U16", 2) X(f16, "F16", 2)                \
  X(bf16, "BF16", 2) X(i32, "I32", 4) X(u32, "U32", 4) X(f32, "F32", 4) X(f64, "F64", 8)     \
  X(i64, "I64", 8) X(u64, "U64", 8)

enum class StDType {
#define MIXSERVE_X(e, s, b) e,
  MIXSERVE_ST_DTYPES(MIXSERVE_X)
#undef MIXSERVE_X
};

std::string_view to_string(StDType d);
std::optional<StDType> parse_st_dtype(std::string_view s);
int64_t st_dtype_bytes(StDType d);

// "[128, 2048]"
std::string shape_string(const std::vector<int64_t>& shape);
int64_t shape_numel(const std::vector<int64_t>& shape);

struct StTensorInfo {
  std::string name;
  StDType dtype = StDType::bf16;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offsets into the data section, [begin, end)
  uint64_t end = 0;
};

// One .safetensors file. The constructor reads and validates the header against the file size:
// truncated file, header length past the end, malformed JSON, unknown dtype, bad shape,
// offsets out of range or not matching dtype x shape, overlapping tensors.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(std::filesystem::path path);

  const std::filesystem::path& path() const { return path_; }
  // Sorted by data offset.
  const std::vector<StTensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const StTensorInfo* find(std::string_view name) const;
  // The tensor's raw bytes (little-endian elements). InputError if the file changed underneath.
  std::vector<uint8_t> read(const StTensorInfo& t) const;

 private:
  std::filesystem::path path_;
  uint64_t data_start_ = 0;  // 8 + header length
  std::vector<StTensorInfo> tensors_;
  std::unordered_map<std::string, size_t> by_name_;
  std::map<std::string, std::string> metadata_;
};

struct StTensorData {
  std::string name;
  StDType dtype = StDType::bf16;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;  // shape_numel(shape) * st_dtype_bytes(dtype)
};

// Writes one file (temp file + rename). Tensors are laid out in the given order; the header is
// padded with spaces to a multiple of 8 bytes. InputError on duplicate names or size mismatch.
void write_safetensors(const std::filesystem::path& path, const std::vector<StTensorData>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// Writes a model.safetensors.index.json (weight_map: tensor name -> shard file name).
void write_safetensors_index(const std::filesystem::path& path,
                             const std::map<std::string, std::string>& weight_map,
                             uint64_t total_size_bytes);

}  // namespace mixserve::model
