"""Test and benchmark helpers for moe_compile (tiny model zoo, see :mod:`moe_compile.testing.zoo`)."""
