// Float64 CPU reference of causal GQA attention over a paged KV cache (the layout of
// kernels/kv_cache.cuh), and the host-side construction of a random mixed step: per sequence a
// context before the step and q_len new tokens, a shuffled (non-contiguous) block table, a pool
// whose unused slots hold NaN (a kernel that reads outside the sequence's positions produces NaN).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

namespace mixserve::test {

struct SeqSpec {
  int ctx_before = 0;  // positions already in the cache
  int q_len = 0;       // new tokens this step (1 = decode)
};

// One step's host data; values are bf16-representable floats (the device copies are exact).
struct PagedStep {
  int q_heads = 0, kv_heads = 0, head_dim = 0, block_tokens = 16;
  std::vector<SeqSpec> seqs;
  int num_tokens = 0, max_q_len = 0, max_seq_len = 0, max_blocks_per_seq = 1;
  int64_t num_blocks = 0;
  std::vector<int32_t> block_table;  // [num_seqs, max_blocks_per_seq]
  std::vector<int32_t> q_start;      // [num_seqs + 1]
  std::vector<int32_t> seq_lens;     // [num_seqs]
  std::vector<int32_t> token_seq, token_pos;  // [num_tokens]
  std::vector<float> k_pool, v_pool; // [num_blocks, block_tokens, kv_heads, head_dim]: the cache after the step
  std::vector<float> k_new, v_new;   // [num_tokens, kv_heads, head_dim]: the step's rows
  std::vector<float> q;              // [num_tokens, q_heads, head_dim]

  int64_t row_offset(int64_t block, int slot, int kvh) const {
    return ((block * block_tokens + slot) * kv_heads + kvh) * int64_t(head_dim);
  }
  int64_t cache_row(int seq, int pos, int kvh) const {
    const int64_t block = block_table[std::size_t(seq) * max_blocks_per_seq + pos / block_tokens];
    return row_offset(block, pos % block_tokens, kvh);
  }
};

// Rounds to the nearest bf16 value (ties to even), as __float2bfloat16_rn does.
inline float round_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  u &= 0xFFFF0000u;
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}

// A random step: K/V of the prior context placed straight into the pool, the new rows kept apart
// (the test writes them with launch_kv_write) and also placed in the pool's expected contents.
// spare_blocks unassigned blocks stay NaN; unused block-table entries point at one of them.
inline PagedStep make_paged_step(int q_heads, int kv_heads, int head_dim, int block_tokens,
                                 const std::vector<SeqSpec>& seqs, uint64_t seed, int spare_blocks = 3,
                                 float q_range = 1.5f) {
  PagedStep s;
  s.q_heads = q_heads;
  s.kv_heads = kv_heads;
  s.head_dim = head_dim;
  s.block_tokens = block_tokens;
  s.seqs = seqs;
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> kv_dist(-1.0f, 1.0f), q_dist(-q_range, q_range);
  std::vector<int> blocks_needed;
  int64_t total_blocks = 0;
  s.q_start.push_back(0);
  for (const auto& sp : seqs) {
    const int len = sp.ctx_before + sp.q_len;
    const int nb = (len + block_tokens - 1) / block_tokens;
    blocks_needed.push_back(nb);
    total_blocks += nb;
    s.max_blocks_per_seq = std::max(s.max_blocks_per_seq, nb);
    s.max_q_len = std::max(s.max_q_len, sp.q_len);
    s.max_seq_len = std::max(s.max_seq_len, len);
    s.seq_lens.push_back(len);
    s.q_start.push_back(s.q_start.back() + sp.q_len);
  }
  s.num_tokens = s.q_start.back();
  s.num_blocks = total_blocks + spare_blocks;
  std::vector<int32_t> perm(std::size_t(s.num_blocks));
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  const int32_t spare = perm.back();  // never assigned: stays NaN
  s.block_table.assign(seqs.size() * std::size_t(s.max_blocks_per_seq), spare);
  std::size_t next = 0;
  for (std::size_t i = 0; i < seqs.size(); ++i)
    for (int b = 0; b < blocks_needed[i]; ++b) s.block_table[i * s.max_blocks_per_seq + b] = perm[next++];

  const float nan = std::numeric_limits<float>::quiet_NaN();
  const int64_t pool = s.num_blocks * block_tokens * kv_heads * int64_t(head_dim);
  s.k_pool.assign(std::size_t(pool), nan);
  s.v_pool.assign(std::size_t(pool), nan);
  s.k_new.resize(std::size_t(s.num_tokens) * kv_heads * head_dim);
  s.v_new.resize(s.k_new.size());
  s.q.resize(std::size_t(s.num_tokens) * q_heads * head_dim);
  for (std::size_t i = 0; i < seqs.size(); ++i) {
    const int len = s.seq_lens[i];
    for (int pos = 0; pos < len; ++pos) {
      const bool is_new = pos >= seqs[i].ctx_before;
      const int token = s.q_start[i] + (pos - seqs[i].ctx_before);
      if (is_new) {
        s.token_seq.push_back(int32_t(i));
        s.token_pos.push_back(pos);
      }
      for (int h = 0; h < kv_heads; ++h) {
        const int64_t dst = s.cache_row(int(i), pos, h);
        for (int d = 0; d < head_dim; ++d) {
          const float kv = round_bf16(kv_dist(rng)), vv = round_bf16(kv_dist(rng));
          s.k_pool[std::size_t(dst + d)] = kv;
          s.v_pool[std::size_t(dst + d)] = vv;
          if (is_new) {
            const std::size_t src = (std::size_t(token) * kv_heads + h) * head_dim + d;
            s.k_new[src] = kv;
            s.v_new[src] = vv;
          }
        }
      }
    }
  }
  for (auto& x : s.q) x = round_bf16(q_dist(rng));
  return s;
}

// out[t, h, :] in float64 for every step token (see attention.cuh for the definition).
inline std::vector<double> ref_paged_attention(const PagedStep& s, double scale) {
  const int D = s.head_dim, group = s.q_heads / s.kv_heads;
  std::vector<double> out(std::size_t(s.num_tokens) * s.q_heads * D, 0.0);
  std::vector<double> score, acc(static_cast<std::size_t>(D));
  for (std::size_t i = 0; i < s.seqs.size(); ++i)
    for (int t = 0; t < s.seqs[i].q_len; ++t) {
      const int token = s.q_start[i] + t, pos = s.seqs[i].ctx_before + t;
      for (int h = 0; h < s.q_heads; ++h) {
        const float* q = &s.q[(std::size_t(token) * s.q_heads + h) * D];
        score.assign(std::size_t(pos) + 1, 0.0);
        double mx = -std::numeric_limits<double>::infinity();
        for (int key = 0; key <= pos; ++key) {
          const float* k = &s.k_pool[std::size_t(s.cache_row(int(i), key, h / group))];
          double dot = 0;
          for (int d = 0; d < D; ++d) dot += double(q[d]) * double(k[d]);
          score[std::size_t(key)] = dot * scale;
          mx = std::max(mx, score[std::size_t(key)]);
        }
        double sum = 0;
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int key = 0; key <= pos; ++key) {
          const double e = std::exp(score[std::size_t(key)] - mx);
          sum += e;
          const float* v = &s.v_pool[std::size_t(s.cache_row(int(i), key, h / group))];
          for (int d = 0; d < D; ++d) acc[std::size_t(d)] += e * double(v[d]);
        }
        double* o = &out[(std::size_t(token) * s.q_heads + h) * D];
        for (int d = 0; d < D; ++d) o[d] = acc[std::size_t(d)] / sum;
      }
    }
  return out;
}

}  // namespace mixserve::test
