"""Helpers for the test suite and the benchmarks: small real datasets built from images that
ship inside installed packages (never downloaded), and archive builders. The process harness
they use to run a real stack is ``ftune.processes``."""
