"""Side-by-side benchmarks and the GPU check (bench/README.md). A package so that the benches share
their timing and reporting helpers; each script also runs on its own (``python bench/<name>.py``)."""
