"""Developer tools run from the repository root (`python -m tools.<name>`): compile checks and kernel reports.

Nothing in the `dinovmf` package imports these; tests and `bench/` do.
"""
