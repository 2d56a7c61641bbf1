"""Graph helpers shared by the passes: naming, op queries, weight slots, initializers."""
