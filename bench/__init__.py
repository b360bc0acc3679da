"""cake's benchmarks (not part of the test suite); see bench/README.md.

Nothing here sets OMP_WAIT_POLICY: every process a benchmark starts runs with the environment it
was given, as its users would run it (`cake-cli` chooses its own thread policy; transformers
gets libgomp's default). Where a benchmark compares policies, it says so and sets them itself.
"""
