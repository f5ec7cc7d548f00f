"""The ``moe_prefill`` torch.compile backend: the whole pipeline in one place.

::

    Dynamo graph (torch IR, parameters lifted to inputs)
      -> AOTAutograd: functional inference ATen graph
      -> passes (moe_compile.passes.build_pipeline): detect -> canonicalize -> lower
      -> Inductor (post-grad custom pass) or eager execution of the rewritten graph

Under Inductor the passes have a stable identity (:mod:`.inductor_cache`), so Inductor's FX graph
cache and AOTAutograd's cache serve a second process; the report is stored beside the cache entry.

Options arrive through ``torch.compile(..., options={...})`` and are validated by
:class:`~moe_compile.options.Options`. The backend is registered under the name
``moe_prefill`` on import and through the ``torch_dynamo_backends`` entry point,
so ``backend="moe_prefill"`` works without importing the package.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from . import inductor_cache
from .debug import GraphDumper
from .graph import normalize_module_path
from .options import Options
from .passes import PassContext, build_pipeline
from .report import Report, Skipped

BACKEND_NAME = "moe_prefill"
TRAINING_REASON = (
    "autograd is on: moe_prefill rewrites inference graphs only "
    "(run under torch.no_grad() or torch.inference_mode()); graph left unchanged"
)

_graph_ids = itertools.count()
_last_report: Report | None = None
#: reports of the graphs compiled while `collect_reports()` is active
_collector: contextvars.ContextVar[list[Report] | None] = contextvars.ContextVar("moe_compile_reports", default=None)


def moe_prefill_backend(gm: fx.GraphModule, example_inputs: list[Any], **kwargs: Any) -> Callable:
    """A torch.compile backend (``backend="moe_prefill"``); ``options`` is the user's dict."""
    return compile_graph(gm, example_inputs, Options.from_user(kwargs.get("options")))


def compile_graph(
    gm: fx.GraphModule,
    example_inputs: list[Any],
    options: Options | None = None,
    pipeline: Callable[[Options], list[Callable[[fx.GraphModule, PassContext], Any]]] = build_pipeline,
) -> Callable:
    """What the backend does, with the passes that ``pipeline(options)`` returns (default: :func:`build_pipeline`).

    :class:`moe_compile.testing.pass_harness.PassHarness` passes its own ``pipeline``: chosen passes,
    each graph kept before and after each pass.
    """
    if options is None:
        options = Options()
    elif not isinstance(options, Options):
        raise TypeError(f"compile_graph takes Options (Options.from_user(a dict)), got {type(options).__name__}")
    graph_name = f"graph_{next(_graph_ids)}"
    report = Report(graphs=1)
    tensors = [t for t in example_inputs if isinstance(t, torch.Tensor)]
    on_cuda = any(t.is_cuda for t in tensors)
    ctx = PassContext(
        options=options,
        report=report,
        graph_name=graph_name,
        real_inputs=list(example_inputs),
        param_names=_param_names(gm),
        training=torch.is_grad_enabled() and any(t.requires_grad for t in tensors),
        dumper=GraphDumper(options.debug_dir, graph_name) if options.debug else None,
        inductor=options.use_inductor(on_cuda),
    )
    passes = pipeline(options)
    relabel = _frame_prefix(ctx.param_names, example_inputs)
    if relabel is not None:
        ctx.param_names = {i: _relabeled(name, relabel) for i, name in ctx.param_names.items()}

    def run_passes(aten_gm: fx.GraphModule) -> None:
        if relabel is not None:
            _relabel_module_stacks(aten_gm, relabel)
        if ctx.real_inputs is not None and len(aten_gm.graph.find_nodes(op="placeholder")) != len(ctx.real_inputs):
            ctx.real_inputs = None  # placeholders do not line up: probe with random weights
        if ctx.training:
            report.skipped.append(Skipped(graph_name, TRAINING_REASON))
        else:
            for graph_pass in passes:
                graph_pass(aten_gm, ctx)
        if ctx.dumper is not None:
            ctx.dumper.summary(aten_gm, report)
        _publish(report)

    if options.use_inductor(on_cuda):
        from torch._inductor.compile_fx import compile_fx

        # a caller's own pipeline (PassHarness: chosen passes, graphs recorded) is never served from the cache
        uuid = inductor_cache.pass_uuid(options) if pipeline is build_pipeline else None
        hook = _InductorPostGradHook(run_passes, uuid)
        patches = {"post_grad_custom_pre_pass": hook, **_parallel_config_patches(options)}
        key = inductor_cache.report_key(hook.uuid(), gm, example_inputs) if hook.uuid() else None
        compiled = compile_fx(gm, example_inputs, config_patches=patches)
        if key is not None:
            if hook.ran:
                inductor_cache.save_report(key, report)
            else:  # Inductor's (or AOTAutograd's) cache hit: the passes did not run in this process
                _publish(inductor_cache.load_report(key, graph_name))
        return _wrapped(compiled, ctx)

    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def fw_compiler(aten_gm: fx.GraphModule, _fake_inputs: list[Any]) -> Callable:
        run_passes(aten_gm)
        return make_boxed_func(_direct_calls(aten_gm).forward)

    return _wrapped(aot_autograd(fw_compiler=fw_compiler)(gm, example_inputs), ctx)


def _direct_calls(gm: fx.GraphModule) -> fx.GraphModule:
    """What runs when the graph runs eagerly: ``gm`` with its ``moe_compile::moe`` calls calling the
    implementation (:func:`moe_compile.ops.canonical.moe_impl`) without the dispatcher. A copy: ``gm`` itself,
    which reports and tests read, keeps the op."""
    from .ops.canonical import moe_impl

    direct = {torch.ops.moe_compile.moe.default: moe_impl}
    if not any(n.target in direct for n in gm.graph.nodes):
        return gm
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    for node in graph.nodes:
        if node.op == "call_function" and node.target in direct:
            node.target = direct[node.target]
    return fx.GraphModule(gm, graph)


def _wrapped(compiled: Callable, ctx: PassContext) -> Callable:
    """``compiled`` as the passes asked: wrapped (``ctx.wrap_compiled``; parallel: world-size check),
    and holding what must live as long as it (``ctx.stores``: the expert stores of offload and AEP with a predictor)."""
    wrap = ctx.wrap_compiled
    keep = list(ctx.stores)
    if keep:
        inner = compiled

        @functools.wraps(inner)
        def compiled(*args: Any) -> Any:
            return inner(*args)

        compiled.moe_compile_keep_alive = keep  # freed with the compiled graph (Dynamo's cache entry)
    return wrap(compiled) if wrap is not None else compiled


def _parallel_config_patches(options: Options) -> dict[str, Any]:
    """Keep AEP's schedule under Inductor.

    :mod:`.passes.async_expert_parallel` pins its gathers and waits with Inductor's ``control_deps``,
    so Inductor's reordering passes stay on. Where that cannot be done (the predicted gather, whose
    order is not pinned; a torch without ``control_deps``) the reorderings that would move a gather
    next to its wait are turned off for the graph.
    """
    from .passes.async_expert_parallel import can_pin_schedule

    if options.parallel != "aep" or (options.predictor is None and can_pin_schedule()):
        return {}
    return {"reorder_for_peak_memory": False, "reorder_for_compute_comm_overlap": False}


class _InductorPostGradHook(CustomGraphPass):
    """Runs the passes inside Inductor, on its post-grad ATen graph.

    ``uuid``: the passes' identity for Inductor's FX graph cache and AOTAutograd's cache
    (:func:`moe_compile.inductor_cache.pass_uuid`); None (no caching) when the passes leave runtime
    state behind that a cached graph would not recreate (offload, parallel, predictor, debug).
    """

    def __init__(self, run: Callable[[fx.GraphModule], None], uuid: str | None):
        self.run = run
        self._uuid = uuid
        self.ran = False

    def __call__(self, graph: fx.Graph) -> None:
        self.ran = True
        self.run(graph.owning_module)

    def uuid(self) -> str | None:
        return self._uuid


def _param_names(gm: fx.GraphModule) -> dict[int, str]:
    """Placeholder position -> parameter or buffer FQN, from Dynamo's sources."""
    names = {}
    for i, node in enumerate(gm.graph.find_nodes(op="placeholder")):
        arg = node.meta.get("grapharg")
        source = getattr(arg, "source", None)
        if source is None:
            continue
        name = source.name() if callable(source.name) else source.name
        names[i] = normalize_module_path(name)
    return names


#: root models whose parameter names give report paths (``explain`` and ``prepare`` register theirs)
_roots: list[weakref.ref] = []


def register_root(model: torch.nn.Module) -> None:
    """Name block paths after ``model``'s module paths, also in graphs that start inside a submodule."""
    _roots[:] = [r for r in _roots if r() is not None and r() is not model][-7:]
    _roots.append(weakref.ref(model))


def _frame_prefix(param_names: dict[int, str], example_inputs: list[Any]) -> tuple[str, str] | None:
    """How this graph's module paths map to a registered model's: ``(frame prefix, model prefix)``.

    After a graph break a graph starts inside a submodule, so Dynamo names its modules from that
    submodule (``layer.1.mlp`` in switch's encoder and decoder alike); a model called through a
    wrapper reads ``args.0.model...``. A parameter's path in the graph and in the registered model
    share their ending; what differs in front is the same for every parameter of the frame.
    """
    roots = [m for r in _roots if (m := r()) is not None]
    if not roots or not param_names:
        return None
    known: dict[int, str] = {}
    for root in roots:
        for name, tensor in itertools.chain(root.named_parameters(remove_duplicate=False), root.named_buffers()):
            known.setdefault(id(tensor), name)
    votes: dict[tuple[str, str], int] = {}
    for i, rel in param_names.items():
        real = example_inputs[i] if i < len(example_inputs) else None
        fqn = known.get(id(real)) if isinstance(real, torch.Tensor) else None
        if fqn is None:
            continue
        a, b = rel.split("."), fqn.split(".")
        n = 0
        while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
            n += 1
        if n == 0:
            continue
        pair = (".".join(a[: len(a) - n]), ".".join(b[: len(b) - n]))
        votes[pair] = votes.get(pair, 0) + 1
    if not votes:
        return None
    pair = max(votes, key=votes.__getitem__)
    return pair if pair[0] != pair[1] else None


def _relabeled(path: str, relabel: tuple[str, str]) -> str:
    old, new = relabel
    if old and not (path == old or path.startswith(old + ".")):
        return path
    rest = path[len(old) :].lstrip(".")
    return ".".join(p for p in (new, rest) if p)


def _relabel_module_stacks(gm: fx.GraphModule, relabel: tuple[str, str]) -> None:
    """Rewrite the graph's module paths (``nn_module_stack``) as the registered model names them."""
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {
                key: (_relabeled(normalize_module_path(path), relabel), cls) for key, (path, cls) in stack.items()
            }


def _publish(report: Report) -> None:
    global _last_report
    _last_report = report
    reports = _collector.get()
    if reports is not None:
        reports.append(report)


@contextlib.contextmanager
def collect_reports() -> Iterator[Report]:
    """Merge the reports of every graph compiled inside the ``with`` block."""
    merged = Report()
    reports: list[Report] = []
    token = _collector.set(reports)
    try:
        yield merged
    finally:
        _collector.reset(token)
        for r in reports:
            merged.merge(r)


def last_report() -> Report | None:
    """The report of the graph the backend compiled last (None before any)."""
    return _last_report


def register() -> None:
    """Register ``moe_prefill`` with Dynamo unless the entry point already does."""
    from torch._dynamo.backends import registry

    if BACKEND_NAME not in registry._BACKENDS and BACKEND_NAME not in registry._COMPILER_FNS:
        registry.register_backend(compiler_fn=moe_prefill_backend, name=BACKEND_NAME)
