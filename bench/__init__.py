"""Microbenchmarks and throughput measurements; every script records through `bench.harness`."""
