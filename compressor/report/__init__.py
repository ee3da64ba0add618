"""Reports that measure what compression costs: the memory-against-accuracy trade-off table and plot."""
