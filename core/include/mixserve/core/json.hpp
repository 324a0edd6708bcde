// JSON views of the core structs (nlohmann::json), for --json output and results files.
// Only files that print JSON include this header.
#pragma once
#include <nlohmann/json.hpp>

#include "mixserve/core/cluster.hpp"
#include "mixserve/core/layout.hpp"
#include "mixserve/core/model.hpp"
#include "mixserve/core/plan.hpp"
#include "mixserve/core/profile.hpp"
#include "mixserve/core/workload.hpp"

namespace mixserve {

nlohmann::json to_json(const ParamBreakdown& p);
nlohmann::json to_json(const Layout& l);
nlohmann::json to_json(const MemoryBreakdown& m);
nlohmann::json to_json(const PredictedMetrics& m);
nlohmann::json to_json(const OpCost& o);
nlohmann::json to_json(const PlanCandidate& c);
nlohmann::json to_json(const RankInfo& r);
nlohmann::json to_json(const RuntimeLimits& r);

}  // namespace mixserve
