#include <doctest/doctest.h>

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <string>

#include "mixserve/core/error.hpp"
#include "mixserve/core/io.hpp"
#include "mixserve/core/model.hpp"
#include "mixserve/core/profile.hpp"

using namespace mixserve;
namespace fs = std::filesystem;

namespace {
// A fresh empty folder under the system temp dir, removed at scope exit.
struct TempDir {
  fs::path path;
  TempDir() {
    path = fs::temp_directory_path() /
           ("mixserve-test-core-" + std::to_string(::getpid()) + "-" + std::to_string(rand()));
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};
}  // namespace

TEST_CASE("sha256 matches the FIPS 180-2 test vectors") {
  // FIPS 180-2, Appendix B.1 ("abc") and B.2 (the 448-bit two-block message); the empty string
  // digest is the one published with the NIST SHA example values.
  CHECK(sha256_hex("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  CHECK(sha256_hex("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  CHECK(sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq") ==
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  // FIPS 180-2 Appendix B.3: one million 'a' (exercises many full blocks).
  CHECK(sha256_hex(std::string(1000000, 'a')) ==
        "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST_CASE("write_file_atomic writes, replaces and leaves no temp file") {
  TempDir d;
  const fs::path f = d.path / "out.yaml";
  write_file_atomic(f, "one\n");
  CHECK(read_text_file(f) == "one\n");
  write_file_atomic(f, "two\n");
  CHECK(read_text_file(f) == "two\n");
  int n = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator(d.path)) ++n;
  CHECK(n == 1);
}

TEST_CASE("write_file_atomic into a missing folder throws and leaves nothing") {
  TempDir d;
  const fs::path f = d.path / "missing" / "out.yaml";
  CHECK_THROWS_AS(write_file_atomic(f, "x"), RuntimeError);
  CHECK_FALSE(fs::exists(f));
  CHECK(fs::is_empty(d.path));
}

TEST_CASE("read_text_file of a nonexistent file throws InputError naming it") {
  try {
    read_text_file("/nonexistent/mixserve-no-such-file.yaml");
    FAIL("no exception");
  } catch (const InputError& e) {
    CHECK(std::string(e.what()).find("mixserve-no-such-file.yaml") != std::string::npos);
  }
}

TEST_CASE("provenance hashes its inputs and stamps tool and time") {
  const Provenance p = make_provenance("mixserve-plan", {{"model.yaml", "abc"}});
  CHECK(p.tool == std::string("mixserve-plan ") + kMixServeVersion);
  REQUIRE(p.inputs.size() == 1);
  CHECK(p.inputs[0].first == "model.yaml");
  CHECK(p.inputs[0].second == sha256_hex("abc"));
  // YYYY-MM-DDTHH:MM:SSZ
  REQUIRE(p.created.size() == 20);
  CHECK(p.created[4] == '-');
  CHECK(p.created[10] == 'T');
  CHECK(p.created.back() == 'Z');
}

TEST_CASE("data_dir follows MIXSERVE_DATA_DIR") {
  const char* old = std::getenv("MIXSERVE_DATA_DIR");
  const std::string saved = old ? old : "";
  ::setenv("MIXSERVE_DATA_DIR", "/some/where", 1);
  CHECK(data_dir() == fs::path("/some/where"));
  if (old) ::setenv("MIXSERVE_DATA_DIR", saved.c_str(), 1);
  else ::unsetenv("MIXSERVE_DATA_DIR");
}

TEST_CASE("enum names come from the header tables") {
  CHECK(to_string(AttentionType::mla) == "mla");
  CHECK(to_string(Scoring::sigmoid) == "sigmoid");
  CHECK(to_string(CostSource::alpha_beta) == "alpha-beta");
  CHECK(to_string(CollOp::fused_rs_combine) == "fused_rs_combine");
}
