"""Item Response Theory for shrinking benchmarks (independent of evomerge)."""
