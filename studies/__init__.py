"""Research studies: training runs that answer a question about the methods (results in studies/results/).

Benchmarks (bench/) measure speed and memory; studies measure what the methods do to the representation.
"""
