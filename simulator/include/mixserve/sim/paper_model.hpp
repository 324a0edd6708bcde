// The MixServe paper's own cost model (paper.md §4-§5, Eqs. 1-13), as the "paper" StepCostModel,
// so its predictions can be compared with the "mixserve" per-op model.
#pragma once
#include <memory>

#include "mixserve/sim/cost_model.hpp"

namespace mixserve::sim {

// Collective sizes (bytes, the `size` argument of the paper's AR/AG/A2A) of one MoE layer for
// `tokens` = b*s tokens of one node (DP replica) of `hidden` elements of `act_bytes`.
//   Eq. 12 (plain EP):  AR(bsh, n_proc) + 2 x A2A(bshk, n_node)
//   Eq. 13 (MixServe):  AR(bsh, n_proc) + AG(bshk/n_proc, n_proc) + 2 x A2A(bshk/n_proc, n_node)
struct PaperMoeVolumes {
  double ar_bytes = 0;   // attention all-reduce
  double ag_bytes = 0;   // intra-node all-gather (Eq. 13 only)
  double a2a_bytes = 0;  // each of dispatch and combine
};
PaperMoeVolumes paper_eq12_volumes(double tokens, int hidden, double act_bytes, int top_k);
PaperMoeVolumes paper_eq13_volumes(double tokens, int hidden, double act_bytes, int top_k,
                                   int n_proc);

// "paper" StepCostModel. See paper_model.cpp for the constants put into the proportionalities.
std::unique_ptr<StepCostModel> make_paper_cost_model(const ModelSpec& m, const ClusterSpec& c,
                                                     const HardwareProfile& p, const Layout& l,
                                                     const CostModelOptions& opt);

}  // namespace mixserve::sim
