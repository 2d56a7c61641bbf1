"""Per-layer debugging: the layer report (--debugDir) and the sensitivity ranking."""
