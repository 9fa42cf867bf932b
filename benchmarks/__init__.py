"""Benchmarks, the pure-autograd baseline and the GPU check of marthe_ext (not part of the
library; see README_SECTION.md)."""
