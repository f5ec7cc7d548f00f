"""One test module per pass (a package, so its helpers do not shadow tests/conftest.py).

Each module runs its pass with :class:`moe_compile.testing.pass_harness.PassHarness` on a graph it
must rewrite (a match) and on one it must leave alone (a near miss), and says why.
"""
