"""Shared test setup.

Triton kernels run through the interpreter when no GPU is present; the switch must
be set before any kernel module is imported, so it lives here, first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# every process a test starts (torchrun's ranks, servers, CLI runs) prints its threads' Python stacks if it crashes
os.environ.setdefault("PYTHONFAULTHANDLER", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n W: W workers share the cores, one torch thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # and in the processes a test starts (ranks, servers)
    torch.set_num_threads(1)

import pytest  # noqa: E402

import moe_compile  # noqa: E402,F401  (registers the backend and the op)
from moe_compile.verify import rel_err  # noqa: F401  (the tests' rel_err is the library's)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no cache entries leak between tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: small ops run several times faster than with two on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_rank():
    """A gloo process group of one rank (HashStore: no port), destroyed after the test."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


#: modules whose tests pytest-xdist may spread over its workers one by one: no module-scoped fixture, many slow
#: tests (one per family) that fill the workers' last minutes evenly
SPREAD = {"test_coverage.py"}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads the xdist_group marks into the ids
def pytest_collection_modifyitems(config, items):
    """The units pytest-xdist (``--dist loadgroup``) hands to a worker whole.

    Tests marked ``ranks`` start a group of processes that each want a core: they all run on one worker, one
    group at a time, while the other worker runs the single-process tests. The tests of any other module run
    on one worker too, so that its module-scoped fixtures (compiled engines, a trained predictor, the GPU
    suite's smoke run) are made once, except the modules in :data:`SPREAD`.
    """
    for item in items:
        if item.get_closest_marker("ranks") is not None:
            item.add_marker(pytest.mark.xdist_group("ranks"))
        elif item.path.name not in SPREAD:
            item.add_marker(pytest.mark.xdist_group(str(item.path.relative_to(config.rootpath))))
