// Test doubles of the step-cost model, so the serving tests do not depend on the real one.
#pragma once
#include <algorithm>
#include <span>
#include <string>

#include "mixserve/sim/cost_model.hpp"

namespace mixserve::sim::testing {

// time_us = base_us + per_token_us * (tokens of the most loaded replica) + per_ctx_us * (its
// decode context): the DP-attention group waits for its slowest replica.
class LinearCost final : public StepCostModel {
 public:
  LinearCost(double base_us, double per_token_us, double per_ctx_us = 0.0,
             int64_t kv_tokens = 1 << 20)
      : base_us_(base_us), per_token_us_(per_token_us), per_ctx_us_(per_ctx_us),
        kv_tokens_(kv_tokens) {}
  std::string name() const override { return "test-linear"; }
  StepCost step(std::span<const ReplicaBatch> per_replica, bool) const override {
    double worst = 0;
    for (const auto& b : per_replica)
      worst = std::max(worst, per_token_us_ * double(b.tokens()) + per_ctx_us_ * double(b.decode_context));
    StepCost c;
    c.time_us = base_us_ + worst;
    c.stage_time_us = c.time_us;
    return c;
  }
  MemoryBreakdown memory(const RuntimeLimits&) const override {
    MemoryBreakdown m;
    m.kv_tokens = kv_tokens_;
    m.fits = true;
    return m;
  }

 private:
  double base_us_, per_token_us_, per_ctx_us_;
  int64_t kv_tokens_;
};

// Every step takes the same time, whatever the batch.
inline LinearCost constant_cost(double time_us) { return LinearCost(time_us, 0.0); }

}  // namespace mixserve::sim::testing
