// Cost model: implemented by the cost-model work (see cost_model.hpp).
