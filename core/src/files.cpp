// File helpers shared by every reader and writer: whole-file reads, atomic writes (temp file in
// the same directory + rename), SHA-256 for provenance, the data directory of shipped configs.
#include <unistd.h>

#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <sstream>

#include <fmt/format.h>

#include "mixserve/core/error.hpp"
#include "mixserve/core/io.hpp"

namespace mixserve {

namespace fs = std::filesystem;

std::string read_text_file(const fs::path& p) {
  std::error_code ec;
  if (!fs::exists(p, ec)) throw InputError(fmt::format("{}: file not found", p.string()));
  if (fs::is_directory(p, ec))
    throw InputError(fmt::format("{}: is a directory, expected a file", p.string()));
  std::ifstream in(p, std::ios::binary);
  if (!in) throw InputError(fmt::format("{}: cannot open: {}", p.string(), std::strerror(errno)));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) throw InputError(fmt::format("{}: read failed", p.string()));
  return ss.str();
}

void write_file_atomic(const fs::path& p, const std::string& content) {
  static std::atomic<unsigned> counter{0};
  const fs::path dir = p.has_parent_path() ? p.parent_path() : fs::path(".");
  const fs::path tmp =
      dir / fmt::format(".{}.tmp.{}.{}", p.filename().string(), static_cast<long>(::getpid()),
                        counter.fetch_add(1));
  auto fail = [&](const std::string& what) {
    std::error_code ec;
    fs::remove(tmp, ec);
    throw RuntimeError(fmt::format("{}: write failed: {}", p.string(), what));
  };
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) fail(fmt::format("cannot create {}: {}", tmp.string(), std::strerror(errno)));
    out.write(content.data(), static_cast<std::streamsize>(content.size()));
    out.flush();
    if (!out) fail(fmt::format("writing {}: {}", tmp.string(), std::strerror(errno)));
  }
  std::error_code ec;
  fs::rename(tmp, p, ec);
  if (ec) fail(fmt::format("rename {} -> {}: {}", tmp.string(), p.string(), ec.message()));
}

// SHA-256 as specified in FIPS 180-4 §6.2 (same algorithm as FIPS 180-2).
namespace {

constexpr std::array<uint32_t, 64> kSha256K = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

constexpr uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

void sha256_block(std::array<uint32_t, 8>& h, const unsigned char* block) {
  std::array<uint32_t, 64> w{};
  for (int t = 0; t < 16; ++t)
    w[t] = (uint32_t(block[4 * t]) << 24) | (uint32_t(block[4 * t + 1]) << 16) |
           (uint32_t(block[4 * t + 2]) << 8) | uint32_t(block[4 * t + 3]);
  for (int t = 16; t < 64; ++t) {
    const uint32_t s0 = rotr(w[t - 15], 7) ^ rotr(w[t - 15], 18) ^ (w[t - 15] >> 3);
    const uint32_t s1 = rotr(w[t - 2], 17) ^ rotr(w[t - 2], 19) ^ (w[t - 2] >> 10);
    w[t] = w[t - 16] + s0 + w[t - 7] + s1;
  }
  uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
  for (int t = 0; t < 64; ++t) {
    const uint32_t S1 = rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25);
    const uint32_t ch = (e & f) ^ (~e & g);
    const uint32_t t1 = hh + S1 + ch + kSha256K[t] + w[t];
    const uint32_t S0 = rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22);
    const uint32_t maj = (a & b) ^ (a & c) ^ (b & c);
    const uint32_t t2 = S0 + maj;
    hh = g;
    g = f;
    f = e;
    e = d + t1;
    d = c;
    c = b;
    b = a;
    a = t1 + t2;
  }
  h[0] += a; h[1] += b; h[2] += c; h[3] += d;
  h[4] += e; h[5] += f; h[6] += g; h[7] += hh;
}

}  // namespace

std::string sha256_hex(const std::string& bytes) {
  std::array<uint32_t, 8> h = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                               0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  const auto* data = reinterpret_cast<const unsigned char*>(bytes.data());
  const size_t n = bytes.size();
  size_t off = 0;
  for (; off + 64 <= n; off += 64) sha256_block(h, data + off);
  // Padding: 0x80, zeros, then the message length in bits as a 64-bit big-endian integer.
  std::array<unsigned char, 128> tail{};
  const size_t rem = n - off;
  std::memcpy(tail.data(), data + off, rem);
  tail[rem] = 0x80;
  const size_t tail_len = rem + 1 + 8 <= 64 ? 64 : 128;
  const uint64_t bits = static_cast<uint64_t>(n) * 8;
  for (int i = 0; i < 8; ++i) tail[tail_len - 1 - i] = static_cast<unsigned char>(bits >> (8 * i));
  for (size_t b = 0; b < tail_len; b += 64) sha256_block(h, tail.data() + b);
  std::string out;
  out.reserve(64);
  for (uint32_t v : h) out += fmt::format("{:08x}", v);
  return out;
}

std::string now_iso8601_utc() {
  const std::time_t t = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

Provenance make_provenance(const std::string& tool,
                           const std::vector<std::pair<std::string, std::string>>& input_texts) {
  Provenance p;
  // A bare tool name gets the MixServe version appended ("mixserve-plan 0.1.0").
  p.tool = tool.find(' ') == std::string::npos ? fmt::format("{} {}", tool, kMixServeVersion) : tool;
  p.created = now_iso8601_utc();
  for (const auto& [name, text] : input_texts) p.inputs.emplace_back(name, sha256_hex(text));
  return p;
}

fs::path data_dir() {
  if (const char* env = std::getenv("MIXSERVE_DATA_DIR"); env != nullptr && *env != '\0')
    return fs::path(env);
#ifdef MIXSERVE_SOURCE_DIR
  {
    std::error_code ec;
    const fs::path src(MIXSERVE_SOURCE_DIR);
    if (fs::is_directory(src / "configs", ec)) return src;
  }
#endif
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) return exe.parent_path().parent_path() / "share" / "mixserve";
  throw RuntimeError(
      "cannot locate the MixServe data directory: set MIXSERVE_DATA_DIR to the folder holding "
      "configs/ and profiles/");
}

}  // namespace mixserve
