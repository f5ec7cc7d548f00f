"""moe_compile.verify: the one tolerance table and the relative error, and that no other table exists."""

import ast
import pathlib

import pytest
import torch

from moe_compile import verify

PACKAGE = pathlib.Path(verify.__file__).parent


def test_rel_err_and_close_on_fresh_inputs():
    gen = torch.Generator().manual_seed(0)
    want = torch.randn(7, 5, generator=gen)
    noise = torch.randn(7, 5, generator=gen)
    got = want + 1e-3 * noise
    expected = ((got.double() - want.double()).norm() / want.double().norm()).item()
    assert verify.rel_err(got, want) == pytest.approx(expected, rel=1e-12)
    assert verify.rel_err(want, want) == 0.0 and verify.rel_err(torch.zeros(3), torch.zeros(3)) == 0.0
    assert verify.rel_err(torch.ones(3), torch.zeros(3)) > 1e100  # only the reference is zero: never close
    assert not verify.close(torch.full((3,), float("nan")), torch.ones(3))
    assert not verify.close(got, want)  # 1e-3 > fp32's 1e-5
    assert verify.close(got.bfloat16(), want.bfloat16())  # within bf16's 2e-2
    assert verify.close(got, want, tol=2e-3)


def test_tolerance_is_the_loosest_of_its_dtypes():
    assert verify.tolerance(torch.float32) == 1e-5 and verify.tolerance(torch.bfloat16) == 2e-2
    assert verify.tolerance(torch.float32, torch.bfloat16) == 2e-2
    assert verify.tolerance(torch.int64) == verify.tolerance(torch.float32)  # not a float: fp32's


def _dtype_tables(path: pathlib.Path) -> list[int]:
    """Lines of dict literals keyed by ``torch.<float dtype>`` with values below 1 (tolerances, not factors)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Dict) or not node.keys:
            continue
        keyed = all(isinstance(k, ast.Attribute) and k.attr in {"float32", "float16", "bfloat16", "float64"}
                    for k in node.keys)  # fmt: skip
        small = all(isinstance(v, ast.Constant) and isinstance(v.value, float) and v.value < 1 for v in node.values)
        if keyed and small:
            found.append(node.lineno)
    return found


def test_there_is_one_tolerance_table():
    tables = {str(p.relative_to(PACKAGE)): lines for p in PACKAGE.rglob("*.py") if (lines := _dtype_tables(p))}
    assert tables == {"verify.py": [_dtype_tables(PACKAGE / "verify.py")[0]]}, tables
