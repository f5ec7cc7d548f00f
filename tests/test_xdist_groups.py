"""The units of ``--dist loadgroup`` reach pytest-xdist's scheduler (tests/conftest.py).

pytest-xdist reads a test's group from a suffix it writes into the node id; with a pytest that no
longer takes that suffix (pytest 9.2 with pytest-xdist 3.8, pytest-xdist issue #1386) every test runs
ungrouped and nothing fails: this test does.
"""

import pytest


def test_this_module_is_one_unit_under_loadgroup(request):
    if not getattr(request.config.option, "loadgroup", False):  # set in an xdist worker under --dist loadgroup
        pytest.skip("not under pytest -n N --dist loadgroup")
    assert request.node.nodeid.endswith("@tests/test_xdist_groups.py"), (
        f"{request.node.nodeid}: pytest-xdist did not tag the test with its group; the ranks tests and each "
        "module's fixtures are no longer kept on one worker (see pyproject.toml's pin of pytest)"
    )
