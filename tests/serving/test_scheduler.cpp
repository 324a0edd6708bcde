// sim::BatchScheduler, the step selection shared by the serving simulator and the GPU engine of
// mixserve-run bench --workload: batches worked out by hand from the policy (scheduler.hpp), and
// invariants over a long random run.
#include <doctest/doctest.h>

#include <map>
#include <numeric>
#include <random>
#include <vector>

#include "mixserve/core/error.hpp"
#include "mixserve/sim/scheduler.hpp"

using namespace mixserve;
using namespace mixserve::sim;

namespace {

RuntimeLimits limits(int seqs, int64_t budget, int block, bool decode_first = true, bool chunked = true) {
  RuntimeLimits L;
  L.max_num_seqs = seqs;
  L.max_num_batched_tokens = budget;
  L.kv_block_tokens = block;
  L.decode_first = decode_first;
  L.chunked_prefill = chunked;
  return L;
}

std::vector<SchedSeq> table(std::initializer_list<std::pair<int64_t, int64_t>> io) {
  std::vector<SchedSeq> t;
  for (auto [i, o] : io) {
    SchedSeq s;
    s.input = i;
    s.output = o;
    t.push_back(s);
  }
  return t;
}

using List = std::vector<std::pair<int32_t, int64_t>>;
List as_list(const std::vector<Scheduled>& v) {
  List l;
  for (const auto& s : v) l.emplace_back(s.seq, s.tokens);
  return l;
}

}  // namespace

TEST_CASE("scheduler: decode-first continuous batching with chunked prefill, by hand") {
  auto seqs = table({{10, 3}, {5, 2}, {3, 1}});
  BatchScheduler s(limits(2, 8, 4), 100, seqs);
  for (int32_t i = 0; i < 3; ++i) s.enqueue(i);
  std::vector<Scheduled> out;
  std::vector<int32_t> tokens_of;
  auto done = [&](int32_t si) { tokens_of.push_back(si); };

  s.schedule(0, out);  // A's first chunk takes the whole budget
  CHECK(as_list(out) == List{{0, 8}});
  s.complete(out, done);
  CHECK(tokens_of.empty());
  CHECK(seqs[0].computed == 8);
  CHECK(seqs[0].blocks == 2);

  s.schedule(1, out);  // running A's last 2 tokens, then B admitted (slots: 2)
  CHECK(as_list(out) == List{{0, 2}, {1, 5}});
  CHECK(batch_of(out, seqs).num_prefill_seqs == 2);
  CHECK(batch_of(out, seqs).prefill_tokens == 7);
  // Causal pairs: A 2 tokens after 8: 2 * (8 + 1.5); B 5 from 0: 5 * 3.
  CHECK(batch_of(out, seqs).prefill_attn_pairs == doctest::Approx(2 * 9.5 + 5 * 3.0));
  s.complete(out, done);
  CHECK(tokens_of == std::vector<int32_t>{0, 1});

  s.schedule(2, out);  // two decodes; C still waits for a slot (B finishes only after this step)
  CHECK(as_list(out) == List{{0, 1}, {1, 1}});
  const ReplicaBatch b = batch_of(out, seqs);
  CHECK(b.num_decode == 2);
  CHECK(b.decode_context == doctest::Approx(11 + 6));  // len = input + generated, itself included
  s.complete(out, done);
  CHECK(seqs[1].done);
  CHECK(seqs[1].blocks == 0);
  CHECK(s.running() == std::vector<int32_t>{0});

  s.schedule(3, out);  // A's last decode, C admitted whole
  CHECK(as_list(out) == List{{0, 1}, {2, 3}});
  s.complete(out, done);
  CHECK(seqs[0].done);
  CHECK(seqs[2].done);
  CHECK(!s.has_work());
  CHECK(s.unfinished() == 0);
  CHECK(s.free_blocks() == 100);
  CHECK(tokens_of == std::vector<int32_t>{0, 1, 0, 1, 0, 2});
}

TEST_CASE("scheduler: prefill-first admits waiting requests before running ones") {
  auto seqs = table({{4, 3}, {6, 2}});
  BatchScheduler s(limits(4, 8, 4, /*decode_first=*/false), 100, seqs);
  s.enqueue(0);
  std::vector<Scheduled> out;
  s.schedule(0, out);
  s.complete(out, [](int32_t) {});
  s.enqueue(1);
  s.schedule(1, out);  // B's prompt first (6 of 8), then A's decode
  CHECK(as_list(out) == List{{1, 6}, {0, 1}});
}

TEST_CASE("scheduler: without chunked prefill a prompt over the remaining budget waits") {
  auto seqs = table({{6, 2}, {5, 2}});
  BatchScheduler s(limits(4, 8, 4, true, /*chunked=*/false), 100, seqs);
  s.enqueue(0);
  s.enqueue(1);
  std::vector<Scheduled> out;
  s.schedule(0, out);
  CHECK(as_list(out) == List{{0, 6}});  // B (5) does not fit the 2 tokens left
  s.complete(out, [](int32_t) {});
  s.schedule(1, out);
  CHECK(as_list(out) == List{{0, 1}, {1, 5}});
}

TEST_CASE("scheduler: preemption by recompute evicts the newest running sequence") {
  auto seqs = table({{8, 10}, {8, 10}});
  BatchScheduler s(limits(4, 16, 4), 4, seqs);  // 4 blocks of 4 tokens
  s.enqueue(0);
  s.enqueue(1);
  std::vector<Scheduled> out;
  s.schedule(0, out);
  CHECK(as_list(out) == List{{0, 8}, {1, 8}});
  CHECK(s.free_blocks() == 0);
  s.complete(out, [](int32_t) {});
  // A's decode at position 8 needs a third block: B (newest, not yet scheduled) is preempted,
  // and decode-first admits nothing in a step that preempted.
  s.schedule(1, out);
  CHECK(as_list(out) == List{{0, 1}});
  CHECK(s.preemptions() == 1);
  CHECK(seqs[1].preemptions == 1);
  CHECK(seqs[1].computed == 0);
  CHECK(seqs[1].blocks == 0);
  CHECK(s.waiting().front() == 1);
  CHECK(seqs[0].blocks == 3);
  CHECK(s.free_blocks() == 1);
  s.complete(out, [](int32_t) {});
  // B re-prefills its prompt and the token it generated (9 tokens, 3 blocks): 1 free, so not yet.
  s.schedule(2, out);
  CHECK(as_list(out) == List{{0, 1}});
}

TEST_CASE("scheduler: invariants over a random run (blocks conserved, limits kept, every token once)") {
  for (const bool decode_first : {true, false}) {
    std::mt19937_64 rng(7);
    std::uniform_int_distribution<int64_t> in(1, 90), outl(1, 40);
    std::vector<SchedSeq> seqs;
    for (int i = 0; i < 200; ++i) {
      SchedSeq q;
      q.input = in(rng);
      q.output = outl(rng);
      seqs.push_back(q);
    }
    const RuntimeLimits L = limits(8, 64, 16, decode_first);
    const int64_t nblocks = 24;  // small: forces preemptions
    BatchScheduler s(L, nblocks, seqs);
    std::map<int32_t, int64_t> produced;
    std::vector<Scheduled> out;
    size_t next = 0;
    int64_t step = 0;
    while (step < 100000) {
      for (int k = 0; k < 3 && next < seqs.size(); ++k) s.enqueue(static_cast<int32_t>(next++));
      if (!s.has_work()) {
        if (next == seqs.size()) break;
        continue;
      }
      s.schedule(step, out);
      REQUIRE(!out.empty());
      int64_t tok = 0, held = 0;
      for (const auto& [si, n] : out) {
        tok += n;
        CHECK(n >= 1);
        CHECK(seqs[si].computed + n <= seqs[si].len());
        CHECK(seqs[si].blocks >= blocks_for(seqs[si].computed + n, L.kv_block_tokens));
      }
      CHECK(tok <= L.max_num_batched_tokens);
      CHECK(int64_t(s.running().size()) <= L.max_num_seqs);
      for (const auto& q : seqs) held += q.blocks;
      CHECK(held + s.free_blocks() == nblocks);
      s.complete(out, [&](int32_t si) { ++produced[si]; });
      ++step;
    }
    CHECK(s.unfinished() == 0);
    CHECK(s.free_blocks() == nblocks);
    int64_t preempted = 0;
    for (size_t i = 0; i < seqs.size(); ++i) {
      CHECK(seqs[i].done);
      CHECK(produced[static_cast<int32_t>(i)] == seqs[i].output);
      preempted += seqs[i].preemptions;
    }
    CHECK(preempted == s.preemptions());
    CHECK(s.preemptions() > 0);  // the cache is small enough to force some
  }
}

TEST_CASE("scheduler: bad limits are input errors") {
  std::vector<SchedSeq> seqs;
  CHECK_THROWS_AS(BatchScheduler(limits(0, 8, 16), 10, seqs), InputError);
  CHECK_THROWS_AS(BatchScheduler(limits(1, 8, 16), 0, seqs), InputError);
}
