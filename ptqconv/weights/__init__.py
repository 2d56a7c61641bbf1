"""Numpy cores that choose a weight's integers: the stored layout (per channel, per tensor,
block-wise), GPTQ, MindSpore's weight correction and its mixed-bit search. No graph here:
the passes read weights out of the graph, call these, and write the results back."""
