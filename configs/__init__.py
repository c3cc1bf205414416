"""YAML presets for `dinovmf train --config NAME` (installed as the data package `dinovmf.configs`)."""
