"""Kernel tests: on CPU the Triton interpreter runs them, so it is switched on before any kernel import."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from .kernel_testing import DEVICE  # noqa: E402


@pytest.fixture(params=[DEVICE])
def device(request) -> str:
    return request.param
