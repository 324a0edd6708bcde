// Layout search: implemented by the planner work.
