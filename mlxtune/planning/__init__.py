"""The memory planner: peak memory of a step from config.json, and the batch plan that fits."""
