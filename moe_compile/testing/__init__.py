"""Test and benchmark helpers for moe_compile.

- :mod:`moe_compile.testing.zoo`: tiny models of many Hugging Face MoE families.
- :mod:`moe_compile.testing.pass_harness`: a torch.compile backend that runs chosen passes and keeps
  each graph before and after each pass (op-count checks), for the tests of each pass.
"""
