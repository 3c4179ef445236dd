"""``replace_blocks``: swap CMRF into an encoder-decoder network someone already wrote.

A *feature extraction block* is a module that maps one tensor ``(B, C_in, *S)`` to one tensor
``(B, C_out, *S)`` (same batch, same spatial size), holds two or more convolutions, and runs all
of them at that spatial size. ``replace_blocks`` finds the outermost such modules and replaces
each by ``CMRF(C_in, C_out, N)``. Shapes are not guessed from names or constructor arguments: the
model is run once on an example input with forward hooks on every module, and each module's
actual input and output are recorded.

Never replaced: the model itself, modules with a single convolution (stems, 1x1 projections),
blocks holding a classifier head (the last-run convolution, and each convolution that feeds a model
output of that convolution's width through no other convolution), modules whose output
resolution differs from their input's or that convolve at another resolution inside (pooling,
strided convolutions, upsampling), modules called with several inputs or keyword arguments,
modules returning something other than one tensor, and modules that already are a CMRF. A
module that is not replaced is searched inside, so a stage ``Sequential(MaxPool, DoubleConv)``
gets its ``DoubleConv`` replaced.

Replacement is all-or-nothing: every new module is built first, the model is changed only when
all of them could be built, and it is run once more afterwards; if that run fails or its output
shapes differ, every swap is undone before the error is raised.
"""

from __future__ import annotations

import contextlib
import fnmatch
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from cmrf._warnings import caller_stacklevel
from cmrf.layers import (
    CMRF,
    check_positive_int,
    cmrf_channels,
    cmrf_num_params,
    compiled_original,
    eval_mode,
    has_user_hooks,
)
from cmrf.ops import reference_only

__all__ = [
    "BlockReplacement",
    "NothingToReplaceWarning",
    "ReplaceReport",
    "SkippedBlock",
    "choose_n",
    "replace_blocks",
]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)

# Default probe side per spatial dimension: every pooling of common U-Nets / SegNets (up to
# 2**5) still leaves at least one pixel, while the probe stays cheap on a CPU.
DEFAULT_PROBE_SIDE = {1: 256, 2: 64, 3: 32}

# Zoo models name the blocks that give the paper's mapping in this attribute; it is used when
# ``targets`` is not given.
DEFAULT_TARGETS_ATTR = "replace_blocks_targets"


class NothingToReplaceWarning(UserWarning):
    """``replace_blocks`` found no block to replace; the model was left unchanged."""


@dataclass(frozen=True)
class BlockReplacement:
    """One replaced module.

    Attributes:
        path: dotted module path inside the model (as in ``named_modules``).
        old_type: class name of the module that was (or, in a dry run, would be) replaced; for a
            ``torch.compile``d block, that of the module it wraps with `` (compiled)`` added.
        in_channels, out_channels: channels seen by the probe.
        N: receptive fields of the CMRF that replaces it (``N' <= N`` when channels forced it).
        old_params, new_params: parameter counts of the old block and of the CMRF.
        spatial_dims: 1, 2 or 3.
    """

    path: str
    old_type: str
    in_channels: int
    out_channels: int
    N: int
    old_params: int
    new_params: int
    spatial_dims: int


@dataclass(frozen=True)
class SkippedBlock:
    """A module that looked like a block but was not replaced, and why."""

    path: str
    type: str
    reason: str


@dataclass
class ReplaceReport:
    """What ``replace_blocks`` did (or, with ``dry_run=True``, would do).

    ``str(report)`` is a table with one row per replaced module path; ``to_dict()`` gives the
    same as JSON-ready data.

    Attributes:
        replaced: the replaced modules, in model order.
        skipped: modules that hold two or more convolutions but were left alone, with reasons.
        params_before: parameters of the model before.
        params_after: parameters after (predicted exactly in a dry run).
        N: the ``N`` that was asked for.
        dry_run: whether the model was left untouched on purpose.
        example_shape: shape of the probe input.
        targets_from_model: whether the targets came from the model's own
            ``replace_blocks_targets`` attribute (or, inside a model nested in it, from that one's).
    """

    replaced: list[BlockReplacement] = field(default_factory=list)
    skipped: list[SkippedBlock] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    N: int = 8
    dry_run: bool = False
    example_shape: tuple[int, ...] | None = None
    targets_from_model: bool = False

    @property
    def changed(self) -> bool:
        """Whether the model was modified."""
        return bool(self.replaced) and not self.dry_run

    @property
    def paths(self) -> list[str]:
        """Paths of the replaced modules."""
        return [r.path for r in self.replaced]

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        verb = "would replace" if self.dry_run else "replaced"
        ratio = self.params_after / self.params_before if self.params_before else 1.0
        lines = [
            f"replace_blocks (N={self.N}{', dry run' if self.dry_run else ''}): {verb} "
            f"{len(self.replaced)} block(s); params {self.params_before:,} -> {self.params_after:,} "
            f"({100 * ratio:.1f}%)"
        ]
        if self.replaced:
            header = ("path", "old block", "channels", "N", "old params", "new params")
            rows = [
                (
                    r.path,
                    r.old_type,
                    f"{r.in_channels} -> {r.out_channels}",
                    str(r.N),
                    f"{r.old_params:,}",
                    f"{r.new_params:,}",
                )
                for r in self.replaced
            ]
            lines += _table(header, rows, right=(3, 4, 5))
        if self.skipped:
            lines.append("skipped:")
            lines += _table(("path", "type", "reason"), [(s.path, s.type, s.reason) for s in self.skipped])
        return "\n".join(lines)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], right: tuple[int, ...] = ()) -> list[str]:
    """Aligned text rows; columns listed in ``right`` (numbers) are right-aligned."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def fmt(row):
        cells = [
            cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))
        ]
        return "  " + "  ".join(cells).rstrip()

    return [fmt(header)] + [fmt(row) for row in rows]


def choose_n(out_channels: int, N: int) -> int | None:
    """The largest ``N' <= N`` with ``out_channels`` divisible by ``2N'``, or ``None`` if odd."""
    for n in range(N, 0, -1):
        if out_channels % (2 * n) == 0:
            return n
    return None


# --- module selectors ------------------------------------------------------------------------


def _as_selectors(name: str, value) -> list:
    """Normalise ``targets``/``exclude``: one selector or an iterable of them."""
    if value is None:
        return []
    if isinstance(value, (str, type)):
        value = [value]
    if not isinstance(value, Iterable):
        raise ValueError(
            f"{name} must be a module class, a class name or path pattern (str), or a list of "
            f"those; got {value!r}"
        )
    selectors = list(value)
    for item in selectors:
        if isinstance(item, str):
            continue
        if isinstance(item, type) and issubclass(item, nn.Module):
            continue
        raise ValueError(
            f"{name} entries must be nn.Module subclasses or strings (class names or path "
            f"patterns such as 'encoder.*'), got {item!r}"
        )
    return selectors


def _path_matches(path: str, pattern: str) -> bool:
    """Shell-style, one dotted part at a time: ``*`` never crosses a dot, as it never crosses a
    ``/`` in a shell, so ``"encoders.*"`` names the encoder blocks, not every module inside them."""
    parts, pattern_parts = path.split("."), pattern.split(".")
    return len(parts) == len(pattern_parts) and all(
        fnmatch.fnmatchcase(part, want) for part, want in zip(parts, pattern_parts, strict=True))


def _matches(selectors: list, path: str, module: nn.Module) -> bool:
    for item in selectors:
        if isinstance(item, str):
            if type(compiled_original(module)).__name__ == item or _path_matches(path, item):
                return True
        elif isinstance(compiled_original(module), item):
            return True
    return False


def _check_selectors_exist(name: str, selectors: list, model: nn.Module) -> None:
    """A string that matches no path and no class name is almost surely a typo: say so."""
    # Every registration counts: a block's second path names it as well as its first.
    modules = dict(model.named_modules(remove_duplicate=False))
    class_names = {type(m).__name__ for m in modules.values()}
    for item in selectors:
        if not isinstance(item, str) or item in class_names:
            continue
        if not any(_path_matches(path, item) for path in modules if path):
            raise ValueError(
                f"{name} entry {item!r} matches no module path and no class name in the model "
                f"(paths look like {', '.join(list(p for p in modules if p)[:5])}; class names "
                f"include {', '.join(sorted(class_names)[:8])})"
            )


# --- probing ---------------------------------------------------------------------------------


@dataclass
class _Call:
    """What one module call looked like."""

    problem: str | None  # why the call cannot be a block's call, or None
    in_shape: tuple[int, ...] | None = None
    out_shape: tuple[int, ...] | None = None
    skip_wrapper: bool = False  # its output concatenates its input (``cat([x, inner(x)])``)
    gate: bool = False  # its output is its input scaled by maps made from it (``x * se(x)``)


@dataclass
class _Probe:
    calls: dict[str, list[_Call]]
    # (path, input shape, output shape, spatial dims, kernel size) of every convolution call, in
    # execution order
    conv_calls: list[tuple[str, tuple[int, ...], tuple[int, ...], int, tuple[int, ...]]]
    output_shapes: object
    # paths of the classifier heads: the last convolution run, and the convolutions whose output
    # reaches a model output (B, C, *S) as wide as that one's through no other convolution
    heads: set[str] = field(default_factory=set)


def _describe_call(args: tuple, kwargs: dict, output) -> _Call:
    if kwargs:
        return _Call(f"called with keyword arguments ({', '.join(kwargs)}); needs exactly one tensor input")
    if len(args) != 1:
        return _Call(f"called with {len(args)} positional inputs; needs exactly one tensor input")
    if not isinstance(args[0], torch.Tensor):
        return _Call(f"its input is a {type(args[0]).__name__}, not a tensor")
    if not isinstance(output, torch.Tensor):
        return _Call(f"returns a {type(output).__name__}, not one tensor")
    return _Call(None, tuple(args[0].shape), tuple(output.shape))


def _shapes(output):
    """The shape structure of a model output (tensor, or nested tuple/list/dict of them)."""
    if isinstance(output, torch.Tensor):
        return tuple(output.shape)
    if isinstance(output, list):
        return [_shapes(o) for o in output]
    if isinstance(output, tuple):
        return tuple(_shapes(o) for o in output)
    if isinstance(output, dict):
        return {k: _shapes(v) for k, v in output.items()}
    return type(output).__name__


def _check_no_lazy_parameters(model: nn.Module) -> None:
    """Refuse lazy modules not yet initialised (``nn.LazyConv2d``...): their shapes, which the
    choice of blocks reads, exist only after a first forward."""
    lazy = [name for name, p in model.named_parameters() if nn.parameter.is_lazy(p)]
    if lazy:
        raise ValueError(
            f"replace_blocks: {type(model).__name__} has lazy modules not initialised yet ({lazy[0]}"
            f"{f' and {len(lazy) - 1} more' if len(lazy) > 1 else ''}), whose shapes are unknown: run one "
            f"forward pass, model(x), before replace_blocks"
        )


def _forward(model: nn.Module, example, grad: bool = False) -> object:
    """``model(example)`` in eval mode without side effects; with ``grad``, recording the autograd
    graph from the (copied) floating-point inputs, so it reaches every convolution."""
    if grad:
        def traced(t: torch.Tensor) -> torch.Tensor:
            if t.is_inference():  # made under inference_mode: a normal copy can be recorded
                t = t.clone()
            # A non-leaf copy: the model may write into its input in place.
            return t.detach().requires_grad_(True).clone() if t.is_floating_point() else t

        example = tuple(map(traced, example)) if isinstance(example, tuple) else traced(example)
    with eval_mode(model), torch.set_grad_enabled(grad), reference_only(), _eager():
        return model(*example) if isinstance(example, tuple) else model(example)


def _eager():
    """Run ``torch.compile``d submodules eagerly: compiling the probe's hooks takes seconds per
    module and spends the user's recompile limit on a forward that is thrown away."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def _run(model: nn.Module, example) -> object:
    """Forward ``example`` in eval mode without grad or side effects; return output shapes."""
    return _shapes(_forward(model, example))


def _tensors(output) -> list[torch.Tensor]:
    """The tensors of a model output (a tensor, or nested tuple/list/dict of them)."""
    return [leaf for leaf in tree_flatten(output)[0] if isinstance(leaf, torch.Tensor)]


def _convs_first_met(node, conv_nodes: dict) -> set:
    """The convolution nodes first met walking the autograd graph back from ``node`` (``node``
    itself if it is one): what lies before another convolution is not reached."""
    found, stack, seen = set(), [node], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in conv_nodes:
            found.add(node)
            continue
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def _graph_heads(output, conv_nodes: dict, classes: int) -> set[str]:
    """The classifier heads, also those of a model with several (deep supervision, auxiliary or
    edge heads), which run in any order: the convolutions whose output reaches an output of the
    model through no other convolution and that either feed no other convolution (a head of any
    width) or are as wide as that output and as the last convolution run (``classes``, the main
    head's width; a coarse head that a refinement stage reads). A returned feature map of another
    width also feeds the network's next convolution, so its block stays replaceable."""
    reaching: dict = {}  # convolution node -> widths of the outputs it reaches
    for tensor in _tensors(output):
        if tensor.dim() >= 3 and tensor.grad_fn is not None:
            for node in _convs_first_met(tensor.grad_fn, conv_nodes):
                reaching.setdefault(node, set()).add(tensor.shape[1])
    feeding = set()
    for node in conv_nodes:
        for next_node, _ in node.next_functions:
            feeding |= _convs_first_met(next_node, conv_nodes)
    heads = set()
    for node, widths in reaching.items():
        path, channels = conv_nodes[node]
        if node not in feeding or channels == classes in widths:
            heads.add(path)
    return heads


_SCRIPTED = "a TorchScript module: its compiled forward would not run a new module; script it after replacing"


def _hookable(modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """``modules`` less TorchScript modules and what lies inside them (they take no hooks)."""
    scripted = tuple(p + "." for p, m in modules.items() if isinstance(m, torch.jit.ScriptModule))
    return {p: m for p, m in modules.items() if not (p + ".").startswith(scripted)}


_SKIP_WRAPPER = ("concatenates its input to its output (a skip connection): the blocks inside are replaced "
                 "instead, keeping that path")


def _concatenates(output: torch.Tensor, given: torch.Tensor) -> bool:
    """Whether ``output`` was made by concatenating ``given`` itself with other tensors, as a skip
    connection's wrapper does (``cat([x, inner(x)])``); read from the probe's autograd graph."""
    node, source = output.grad_fn, given.grad_fn
    if node is None or source is None or not type(node).__name__.startswith("CatBackward"):
        return False
    return any(next_node is source for next_node, _ in node.next_functions)


def _gates(output: torch.Tensor, given: torch.Tensor) -> bool:
    """Whether ``output`` is ``given`` scaled by maps computed from it, as attention gates make it
    (``x * se(x)``, scSE's ``x * cse(x) + x * sse(x)``, CBAM's ``x * ca(x) * sa(...)``); read from
    the probe's autograd graph."""
    if output.grad_fn is None or given.grad_fn is None:
        return False
    return _scales(output.grad_fn, given.grad_fn)


def _scales(node, source, depth: int = 0) -> bool:
    """Whether autograd ``node`` is a product taking ``source`` (or such a product) as a factor,
    or a sum of such products."""
    if depth > 8:
        return False
    children = [child for child, _ in node.next_functions if child is not None]
    kind = type(node).__name__
    if kind.startswith("MulBackward"):
        return any(child is source or _scales(child, source, depth + 1) for child in children)
    if kind.startswith("AddBackward"):
        return bool(children) and all(_scales(child, source, depth + 1) for child in children)
    return False


_GATE = ("multiplies its input by maps it computes from it (an attention gate such as scSE or "
         "squeeze-excitation): a CMRF in its place would replace the gated features with new ones")


def _probe(model: nn.Module, modules: dict[str, nn.Module], example) -> _Probe:
    calls: dict[str, list[_Call]] = {}
    conv_calls: list[tuple[str, tuple[int, ...], tuple[int, ...], int, tuple[int, ...]]] = []
    conv_nodes: dict = {}  # autograd node of each convolution's output -> (path, out channels)

    def make_hook(path: str, module: nn.Module):
        def hook(mod, args, kwargs, output):
            call = _describe_call(args, kwargs, output)
            call.skip_wrapper = call.problem is None and _concatenates(output, args[0])
            call.gate = call.problem is None and _gates(output, args[0])
            calls.setdefault(path, []).append(call)
            if isinstance(mod, _CONVS) and isinstance(output, torch.Tensor) and args:
                shapes = (tuple(args[0].shape), tuple(output.shape))
                conv_calls.append((path, *shapes, mod.weight.dim() - 2, tuple(mod.kernel_size)))
                if output.grad_fn is not None:
                    conv_nodes[output.grad_fn] = (path, output.shape[1])

        return hook

    hookable = _hookable(modules).items()
    handles = [m.register_forward_hook(make_hook(p, m), with_kwargs=True) for p, m in hookable]
    try:
        try:
            output = _forward(model, example, grad=True)
        except Exception as err:  # a forward that cannot record gradients: probe without the graph
            for record in (calls, conv_calls, conv_nodes):
                record.clear()
            output = _forward(model, example)
            warnings.warn(
                f"replace_blocks could not record the autograd graph of {type(model).__name__}'s "
                f"forward ({type(err).__name__}: {err}), so it chose blocks by shapes alone: skip "
                f"connections, gates and heads were not recognised. Check the report, or name the "
                f"blocks with targets=[...]",
                stacklevel=caller_stacklevel(),
            )
    except Exception as err:  # the model's own forward failed: explain what was tried
        shape = tuple(example.shape) if isinstance(example, torch.Tensor) else "a tuple of inputs"
        raise ValueError(
            f"replace_blocks could not run {type(model).__name__} on the probe input {shape} "
            f"({type(err).__name__}: {err}); pass example_input= with an input the model accepts"
        ) from err
    finally:
        for handle in handles:
            handle.remove()
    heads = set()
    if conv_calls:
        last_path, _, last_out, _, _ = conv_calls[-1]
        heads = _graph_heads(output, conv_nodes, last_out[1]) | {last_path}
    return _Probe(calls, conv_calls, _shapes(output), heads)


_MAX_DEFAULT_PROBES = 4


def _default_examples(model: nn.Module) -> list[torch.Tensor]:
    """Probe inputs ``(2, C, S, ..., S)`` to try in turn, on the device and dtype of the model's
    first convolution: ``C`` the channels its timm ``pretrained_cfg`` gives, then those of its
    convolutions in registration order (the first registered is usually, not always, the input's:
    a head may be declared before the stem). Empty for a model without convolutions."""
    convs = [m for m in model.modules() if isinstance(m, _CONVS)]
    if not convs:
        return []
    first = convs[0]
    spatial_dims = len(first.kernel_size)
    cfg = getattr(model, "pretrained_cfg", None)
    cfg_size = cfg.get("input_size") if isinstance(cfg, dict) else None
    fits = isinstance(cfg_size, (tuple, list)) and len(cfg_size) == spatial_dims + 1
    channels = [cfg_size[0]] if fits else []
    channels += [conv.in_channels for conv in convs if len(conv.kernel_size) == spatial_dims]
    channels = list(dict.fromkeys(channels))[:_MAX_DEFAULT_PROBES]
    side = DEFAULT_PROBE_SIDE[spatial_dims]
    examples = []
    for c in channels:
        # A private generator: probing must not move the caller's random stream.
        generator = torch.Generator().manual_seed(0)
        example = torch.randn((2, c) + (side,) * spatial_dims, generator=generator)
        examples.append(example.to(device=first.weight.device, dtype=first.weight.dtype))
    return examples


def _default_probe(model: nn.Module, modules: dict[str, nn.Module], examples: list[torch.Tensor]):
    """``(example, probe)`` for the first of ``examples`` that the model runs."""
    errors = []
    for example in examples:
        try:
            return example, _probe(model, modules, example)
        except ValueError as err:
            errors.append(err)
    shapes = ", ".join(str(tuple(example.shape)) for example in examples)
    cause = errors[0].__cause__
    inputs = "inputs" if len(examples) > 1 else "input"
    raise ValueError(
        f"replace_blocks could not run {type(model).__name__} on its default probe {inputs} {shapes} "
        f"(made from its convolutions' input channels; the first failed with "
        f"{type(cause).__name__}: {cause}); pass example_input= with an input the model accepts"
    ) from cause


# --- selection -------------------------------------------------------------------------------


@dataclass
class _Plan:
    path: str
    module: nn.Module
    in_channels: int
    out_channels: int
    N: int
    spatial_dims: int
    aliases: tuple[str, ...] = ()  # the block's other registrations, swapped with it

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.path, *self.aliases)


def _num_convs(module: nn.Module) -> int:
    return sum(isinstance(m, _CONVS) for m in module.modules())


def _block_problem(path: str, module: nn.Module, probe: _Probe) -> tuple[str | None, bool]:
    """Why ``module`` cannot be replaced (or ``None``), and whether that is worth reporting.

    Resolution changes are not reported: they mark containers (stages with pooling, whole
    encoders), which are searched inside instead.
    """
    calls = probe.calls.get(path)
    if not calls:
        return "never called in the probe forward", True
    problems = [c.problem for c in calls if c.problem]
    if problems:
        return problems[0], True
    first = calls[0]
    if any((c.in_shape, c.out_shape) != (first.in_shape, first.out_shape) for c in calls):
        return f"called {len(calls)} times with different shapes", True
    in_shape, out_shape = first.in_shape, first.out_shape
    if len(in_shape) != len(out_shape) or len(in_shape) not in (3, 4, 5):
        return f"maps {in_shape} to {out_shape}, not (B, C, *spatial) to (B, C', *spatial)", True
    if in_shape[0] != out_shape[0]:
        return f"changes the batch size ({in_shape} -> {out_shape})", True
    if in_shape[2:] != out_shape[2:]:
        return f"changes resolution ({in_shape} -> {out_shape})", False
    prefix = path + "."
    spatial = in_shape[2:]
    convs = [call for call in probe.conv_calls if call[0].startswith(prefix)]
    # A convolution called on dims + 1 dimensions ran unbatched; another rank of a batched call
    # is a block's own business (an ECA attention's Conv1d over pooled channels).
    wrong_rank = [(conv, dims) for conv, conv_in, _, dims, _ in convs if len(conv_in) == dims + 1]
    if wrong_rank:  # an unbatched example_input: (C, H, W) would be read as (B, C, L)
        conv, dims = wrong_rank[0]
        return (f"takes a {in_shape} input, but its convolution {conv} is {dims}-D and wants (B, C) and "
                f"{dims} spatial sizes: give example_input a batch dimension"), True
    on_the_grid = False  # whether a convolution runs on the block's own grid
    for conv, conv_in, conv_out, _, kernel in convs:
        # A global-context branch (squeeze-excitation) runs 1x1 convolutions on pooled 1x1 maps:
        # allowed. A wider kernel on a map that only shrank to 1x1 at the probe's size is a
        # convolution at another resolution, whatever the probe's size.
        global_context = all(s == 1 for s in conv_in[2:] + conv_out[2:] + kernel)
        if conv_out[2:] != spatial and not global_context:
            return f"runs {conv} at another resolution {conv_out[2:]} inside", False
        on_the_grid = on_the_grid or not global_context
    if convs and not on_the_grid and any(s != 1 for s in spatial):
        # A gate (squeeze-excitation) only scales its input: a CMRF in its place would turn
        # the gated block's output into a new feature map.
        return "convolves only pooled 1x1 maps (a gate such as squeeze-excitation), not its input", False
    heads = sorted(head for head in probe.heads if head == path or head.startswith(prefix))
    if heads:
        return f"holds the network's final convolution {heads[0]} (a classifier head)", True
    if any(call.skip_wrapper for call in calls):  # a CMRF in its place would drop the skip path
        return _SKIP_WRAPPER, True
    if any(call.gate for call in calls):  # (not reported, as the squeeze-excitation case above)
        return _GATE, False
    return None, False


def _nested_targets(modules: dict[str, nn.Module]) -> dict[str, list]:
    """``{path: selectors}`` of the models nested inside (a zoo model in a user's wrapper) that name
    their own ``replace_blocks_targets``: inside each, its mapping applies, its path patterns
    prefixed with its path."""
    scopes = {}
    for path, module in modules.items():
        own = getattr(module, DEFAULT_TARGETS_ATTR, None) if path else None
        if own is not None:
            selectors = []
            for item in _as_selectors(f"{path}.{DEFAULT_TARGETS_ATTR}", own):
                # a string is a class name as it is, and a path pattern below ``path``
                selectors += [item, f"{path}.{item}"] if isinstance(item, str) else [item]
            scopes[path] = selectors
    return scopes


def _scope_of(scopes: dict[str, list], path: str) -> list:
    """The selectors that apply at ``path``: those of the innermost scope holding it."""
    holders = [scope for scope in scopes if not scope or path.startswith(scope + ".")]
    return scopes[max(holders, key=len)]


def _select(
    model: nn.Module,
    modules: dict[str, nn.Module],
    probe: _Probe,
    N: int,
    scopes: dict[str, list],
    exclude: list,
    indivisible: str,
) -> tuple[list[_Plan], list[SkippedBlock]]:
    plans: list[_Plan] = []
    skipped: list[SkippedBlock] = []
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        owners.setdefault(id(module), []).append(name)

    def visit(path: str, module: nn.Module, inherited: bool = False) -> None:
        for name, child in module.named_children():
            child_path = f"{path}.{name}" if path else name
            if modules.get(child_path) is child:  # first registration of a shared module only
                consider(child_path, child, inherited)

    def consider(path: str, module: nn.Module, inherited: bool = False) -> None:
        """``inherited``: a container (ModuleList, ModuleDict) that a target names passes it on to
        its entries, as ``"encoder*"`` names the blocks of an ``encoder`` list."""
        kind = type(module).__name__
        if isinstance(module, torch.jit.ScriptModule):  # its convolutions are not nn.Conv modules
            if any(p.dim() >= 3 for p in module.parameters()):  # but it has convolution weights
                skipped.append(SkippedBlock(path, kind, _SCRIPTED))
            return
        n_convs = _num_convs(module)
        if n_convs == 0:
            return
        aliases = tuple(other for other in owners.get(id(module), ()) if other != path)

        def named(selectors: list) -> bool:  # at any of the module's paths
            return any(_matches(selectors, where, module) for where in (path, *aliases))

        if exclude and named(exclude):
            skipped.append(SkippedBlock(path, kind, "excluded"))
            return
        targets = _scope_of(scopes, path)
        if isinstance(module, CMRF):
            if inherited or (targets and named(targets)):
                skipped.append(SkippedBlock(path, kind, "already a CMRF"))
            return
        if isinstance(module, _CONTAINERS):
            visit(path, module, inherited or (bool(targets) and named(targets)))
            return
        kept = next((p for p, m in module.named_modules(prefix=path) if isinstance(m, CMRF)), None)
        if kept is not None:  # a CMRF of an earlier call: replacing the block would drop its weights
            if n_convs >= 2:
                skipped.append(SkippedBlock(path, kind, f"holds the CMRF {kept}"))
            visit(path, module)
            return
        inner = _excluded_inside(exclude, path, module)
        if inner is not None:  # replacing the block would remove what exclude keeps
            if n_convs >= 2:
                skipped.append(SkippedBlock(path, kind, f"holds the excluded module {inner}"))
            visit(path, module)
            return
        targeted = inherited or (bool(targets) and named(targets))
        if targets and not targeted:
            visit(path, module)
            return
        if n_convs < (1 if targeted else 2):
            return
        problem, report = _block_problem(path, module, probe)
        if problem is None:
            call = probe.calls[path][0]
            in_channels, out_channels = call.in_shape[1], call.out_shape[1]
            n = _pick_n(out_channels, N, indivisible)
            if n is None:
                problem, report = _channel_problem(out_channels, N, indivisible), True
            else:
                cmrf_channels(in_channels, out_channels, n)  # double-check the arithmetic
                spatial_dims = len(call.in_shape) - 2
                plans.append(_Plan(path, module, in_channels, out_channels, n, spatial_dims, aliases))
                return
        if report or targeted:
            skipped.append(SkippedBlock(path, kind, problem))
        visit(path, module)

    visit("", model)
    # Drop, one at a time, the plans that would leave a part of their block in the model, and
    # look for blocks inside them instead.
    while partial := [(plan, why) for plan in plans if (why := _shared_outside(plan, plans, owners))]:
        plan, why = partial[0]
        plans.remove(plan)
        skipped.append(SkippedBlock(plan.path, _kind(plan.module), why))
        visit(plan.path, plan.module)
    return plans, skipped


def _shared_outside(plan: _Plan, plans: list[_Plan], owners: dict[int, list[str]]) -> str | None:
    """Why replacing ``plan``'s block would leave a part of it in the model: a block inside it
    that is replaced on its own (registered again outside it, as MONAI's DynUNet runs its blocks
    through ``skip_layers``), or a module inside it also registered outside every replaced block,
    which would keep its parameters and maybe its use. A convolution shared by two replaced
    blocks (tied weights) goes with both."""
    own = {id(other.module): other.path for other in plans if other is not plan}
    replaced = tuple(path + "." for other in plans for path in other.paths)
    for inner_path, inner in plan.module.named_modules(prefix=plan.path):
        if inner is plan.module:
            continue
        if id(inner) in own:
            return f"holds {inner_path}, which is replaced on its own (as {own[id(inner)]})"
        outside = [other for other in owners.get(id(inner), ()) if not other.startswith(replaced)]
        if outside:
            return f"holds {inner_path}, which is also registered at {outside[0]} outside it"
    return None


def _excluded_inside(exclude: list, path: str, module: nn.Module) -> str | None:
    """The path of the first module below ``module`` that ``exclude`` matches, or ``None``."""
    if not exclude:
        return None
    inside = ((p, m) for p, m in module.named_modules(prefix=path) if p != path)
    return next((p for p, m in inside if _matches(exclude, p, m)), None)


def _pick_n(out_channels: int, N: int, indivisible: str) -> int | None:
    """``N`` when ``2N`` divides ``out_channels``; else per ``indivisible`` the largest ``N'`` or None.

    Never a reduction to ``N' = 1``: that CMRF has no cascade, so no spatial convolution at all."""
    if out_channels % (2 * N) == 0:
        return N
    reduced = choose_n(out_channels, N) if indivisible == "reduce" else None
    return reduced if reduced != 1 else None


def _channel_problem(out_channels: int, N: int, indivisible: str) -> str:
    if indivisible == "skip":
        return f"out_channels {out_channels} is not divisible by 2N = {2 * N} (indivisible='skip')"
    if out_channels % 2 == 0:
        return (f"out_channels {out_channels} is divisible by 2N' only for N' = 1, a CMRF without a "
                f"spatial convolution (N=1 asks for it)")
    return f"out_channels {out_channels} is odd: no N' >= 1 makes it divisible by 2N'"


# --- the public function ---------------------------------------------------------------------


def replace_blocks(
    model: nn.Module,
    N: int = 8,
    *,
    targets=None,
    exclude=None,
    dry_run: bool = False,
    example_input: torch.Tensor | tuple | None = None,
    indivisible: str = "reduce",
) -> ReplaceReport:
    """Replace the feature extraction blocks of ``model`` by CMRF modules, in place.

    Args:
        model: any network taking one tensor (or the tuple ``example_input``); 1D, 2D or 3D.
        N: receptive fields of every CMRF. Default 8 (the paper's).
        targets: restrict the choice to modules matching any of these: an ``nn.Module`` subclass,
            a class name (``"DoubleConv"``), or a path pattern (``"encoder.*"``, shell-style,
            matched against ``named_modules`` paths one dotted part at a time: ``*`` does not
            cross a dot, so ``"encoder.*"`` names ``encoder.0`` but not ``encoder.0.conv``).
            Matching modules are replaced when they pass the shape checks, even with a single
            convolution; non-matching ones are searched inside. Default ``None``: the model's
            ``replace_blocks_targets`` attribute if it has one (zoo models use it to give the
            paper's mapping), else every block qualifies; inside a module that has its own (a
            zoo model in your wrapper), that module's mapping applies.
        exclude: selectors as in ``targets``; matching modules and everything inside them stay.
        dry_run: only report what would be replaced; the model is not touched. (The probe runs
            the model's forward, so its forward hooks see the probe input, also in a dry run.)
        example_input: probe input. Default: ``randn(2, C, S, ...)`` with the number of spatial
            dimensions of the model's first registered convolution, ``S`` = 256 (1D), 64 (2D) or
            32 (3D), on that convolution's device and dtype, and ``C`` the first that the model
            runs of: the channels of its timm ``pretrained_cfg["input_size"]``, then its
            convolutions' input channels in registration order (four tries at most).
        indivisible: what to do with a block whose ``out_channels`` is not divisible by ``2N``:
            ``"reduce"`` (default) uses the largest ``N' <= N`` that divides (odd channel counts,
            and those only ``N' = 1`` divides when ``N > 1``, are skipped: that CMRF has no
            spatial convolution), ``"skip"`` leaves the block and says why in the report.

    Returns:
        A ``ReplaceReport`` (``print`` it): one row per replaced path with old and new parameter
        counts and channels, and the blocks skipped with reasons.

    New modules are put on the replaced block's device and dtype, in its training mode, and
    frozen if every parameter of the block was frozen. If nothing qualifies, the model is left
    unchanged and a ``NothingToReplaceWarning`` is issued (not an error, so sweeps over many
    models keep going; turn it into one with ``warnings.simplefilter("error",
    NothingToReplaceWarning)``).

    A block registered at several paths (MONAI's DynUNet runs its blocks through ``skip_layers``)
    becomes one CMRF at every path. CMRFs already in the model, and blocks holding one, are kept.
    ``torch.compile`` and ``nn.DataParallel`` wrappers are looked through: the swap goes into the
    module they hold, whose paths the report gives.

    Raises:
        ValueError: bad ``N``, ``targets``, ``exclude``, ``indivisible`` or ``example_input``, a
            string selector that matches nothing, lazy modules not yet initialised, a model that
            fails on the probe input, one
            wrapped in ``DistributedDataParallel``/FSDP (replace before wrapping), or a
            TorchScript module (replace in the Python model).
        RuntimeError: the model no longer runs, its output shapes change, or a new module is not
            called, in an eval-mode forward after the swap (for example when its ``forward`` reads
            attributes of the replaced modules, or runs them through a plain list); every swap is
            undone first.
    """
    # Under torch.inference_mode the probe would record no autograd graph (the skip, gate and head
    # checks read it: a wrong block was swapped) and the new weights would be inference tensors,
    # which cannot train.
    with torch.inference_mode(False):
        return _replace_blocks(model, N, targets=targets, exclude=exclude, dry_run=dry_run,
                               example_input=example_input, indivisible=indivisible)


def _replace_blocks(model, N, *, targets, exclude, dry_run, example_input, indivisible) -> ReplaceReport:
    if not isinstance(model, nn.Module):
        raise ValueError(f"replace_blocks needs an nn.Module, got {type(model).__name__}")
    model = _swappable(model)
    _check_not_wrapped(model)
    N = check_positive_int("N", N)
    if indivisible not in ("reduce", "skip"):
        raise ValueError(f"indivisible must be 'reduce' or 'skip', got {indivisible!r}")
    modules = dict(model.named_modules())
    nested = _nested_targets(modules) if targets is None else {}
    targets_from_model = targets is None and getattr(model, DEFAULT_TARGETS_ATTR, None) is not None
    if targets_from_model:
        targets = getattr(model, DEFAULT_TARGETS_ATTR)
    targets = _as_selectors("targets", targets)
    exclude = _as_selectors("exclude", exclude)
    _check_selectors_exist("targets", targets, model)
    _check_selectors_exist("exclude", exclude, model)

    _check_no_lazy_parameters(model)
    params_before = sum(p.numel() for p in model.parameters())
    report = ReplaceReport(
        params_before=params_before,
        params_after=params_before,
        N=N,
        dry_run=bool(dry_run),
        targets_from_model=targets_from_model or bool(nested),
    )
    given_type = type(example_input).__name__  # a list is taken as a tuple below
    probe = None
    if example_input is None:
        examples = _default_examples(model)
        if not examples:
            warnings.warn(
                f"replace_blocks: {type(model).__name__} has no convolution, nothing to replace; "
                f"the model is unchanged",
                NothingToReplaceWarning,
                stacklevel=caller_stacklevel(),
            )
            return report
        example_input, probe = _default_probe(model, modules, examples)
    elif isinstance(example_input, list):
        example_input = tuple(example_input)
    if not isinstance(example_input, torch.Tensor) and not (
        isinstance(example_input, tuple) and all(isinstance(t, torch.Tensor) for t in example_input)
    ):
        got = given_type
        if isinstance(example_input, tuple):
            got += " of " + ", ".join(sorted({type(t).__name__ for t in example_input}))
        shape_hint = ""
        sizes = isinstance(example_input, tuple) and all(isinstance(t, int) for t in example_input)
        if sizes and example_input:
            shape_hint = f"; for a shape, pass a tensor of it: torch.randn{tuple(example_input)}"
        raise ValueError(f"example_input must be a tensor (or a tuple of tensors), got {got}{shape_hint}")
    if isinstance(example_input, torch.Tensor):
        report.example_shape = tuple(example_input.shape)

    if probe is None:
        probe = _probe(model, modules, example_input)
    scopes = {"": targets, **nested}
    plans, report.skipped = _select(model, modules, probe, N, scopes, exclude, indivisible)
    if not plans:
        reasons = "; ".join(f"{s.path}: {s.reason}" for s in report.skipped[:5])
        warnings.warn(
            f"replace_blocks found no feature extraction block to replace in "
            f"{type(model).__name__} (a module mapping (B, C, *S) to (B, C', *S) with two or more "
            f"convolutions){'; skipped: ' + reasons if reasons else ''}; the model is unchanged",
            NothingToReplaceWarning,
            stacklevel=caller_stacklevel(),
        )
        return report

    # Build every new module before touching the model: a failure here changes nothing. A dry
    # run builds none (initialising weights would move the caller's random stream).
    new_modules = [] if dry_run else [_build_cmrf(plan) for plan in plans]
    for plan in plans:
        old_params = sum(p.numel() for p in plan.module.parameters())
        new_params = cmrf_num_params(plan.in_channels, plan.out_channels, plan.N, plan.spatial_dims)
        report.replaced.append(
            BlockReplacement(
                plan.path,
                _kind(plan.module),
                plan.in_channels,
                plan.out_channels,
                plan.N,
                old_params,
                new_params,
                plan.spatial_dims,
            )
        )
    if not dry_run:
        frozen = [plan.path for plan in plans if _frozen(plan.module)]
        hooked = _hooked_paths(plans)
        _swap_all(model, plans, new_modules, example_input, probe.output_shapes)
        _refresh_first_conv(model)
        report.params_after = sum(p.numel() for p in model.parameters())
        if frozen:
            warnings.warn(
                f"replace_blocks replaced frozen blocks ({', '.join(frozen)}) by CMRFs with fresh random "
                f"weights, frozen as the blocks were, so they will never learn: unfreeze them "
                f"(model.get_submodule(path).requires_grad_(True)), or keep the blocks (exclude=[...])",
                stacklevel=caller_stacklevel(),
            )
        if hooked:
            warnings.warn(
                f"replace_blocks removed modules that had hooks registered ({', '.join(hooked)}); "
                f"those hooks no longer run: register them again on the CMRF modules if needed",
                stacklevel=caller_stacklevel(),
            )
    else:
        report.params_after = _kept_params(model, plans) + sum(r.new_params for r in report.replaced)
    return report


# Wrappers that hold their own references to the parameters (gradient buckets, shards): a swap
# inside them would train the old parameters, or none.
# By class name, so that torch.distributed is not imported; FSDPModule is what fully_shard makes.
_DISTRIBUTED_WRAPPERS = ("DistributedDataParallel", "FullyShardedDataParallel", "FSDPModule")


def _swappable(model: nn.Module) -> nn.Module:
    """The module inside ``torch.compile`` and ``nn.DataParallel`` wrappers, where the swap goes.

    Both run the module they hold at each call (DataParallel copies it to its GPUs then), so
    swapped blocks run, and report paths carry no ``_orig_mod.``/``module.`` prefix. The probe
    runs without Dynamo compiling its hooks; a compiled wrapper compiles again at its next call,
    since the modules it traced have changed. DDP and FSDP are refused (``_check_not_wrapped``).
    """
    while True:
        inner = compiled_original(model)
        if isinstance(inner, nn.DataParallel):
            inner = inner.module
        if inner is model:
            return model
        model = inner


def _kind(block: nn.Module) -> str:
    """The class name a report shows for ``block``; a ``torch.compile``d one (it is replaced with
    its wrapper, which would go on running the old block) by the class it holds."""
    original = compiled_original(block)
    return type(block).__name__ if original is block else f"{type(original).__name__} (compiled)"


def _check_not_wrapped(model: nn.Module) -> None:
    """Refuse a model whose forward or gradient synchronisation would not see swapped modules."""
    kind = type(model).__name__
    if isinstance(model, torch.jit.ScriptModule):  # scripted or traced: its forward is a fixed graph
        raise ValueError(
            f"replace_blocks got a TorchScript module ({kind}), whose compiled forward would not run "
            f"new modules: replace the blocks in the Python model, then script or trace it again"
        )
    for path, module in model.named_modules():
        if any(cls.__name__ in _DISTRIBUTED_WRAPPERS for cls in type(module).__mro__):
            kind = type(module).__name__
            where = f" (at {path})" if path else ""
            raise ValueError(
                f"replace_blocks got a model wrapped in {kind}{where}, whose gradient synchronisation "
                f"holds the old parameters: replace the blocks before wrapping (replace_blocks(model), "
                f"then {kind}(model))"
            )


def _hooked_paths(plans: list[_Plan]) -> list[str]:
    """Paths of the modules in the planned blocks that have forward or backward hooks of the user's."""
    return [
        path
        for plan in plans
        for path, module in plan.module.named_modules(prefix=plan.path)
        if has_user_hooks(module)
    ]


def _kept_params(model: nn.Module, plans: list[_Plan]) -> int:
    """Parameters the model keeps after the planned blocks go, each counted once: one shared by
    two blocks is not removed twice, one a kept module shares is not removed at all."""
    replaced = tuple(path for plan in plans for path in plan.paths)
    kept = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if not any(path == r or path.startswith(r + ".") for r in replaced):
            kept.update((id(p), p.numel()) for p in module.parameters(recurse=False))
    return sum(kept.values())


def _frozen(module: nn.Module) -> bool:
    """Whether ``module`` has parameters and none of them trains."""
    params = list(module.parameters())
    return bool(params) and not any(p.requires_grad for p in params)


def _build_cmrf(plan: _Plan) -> CMRF:
    old = plan.module
    param = next(old.parameters(), None)
    new = CMRF(plan.in_channels, plan.out_channels, plan.N, spatial_dims=plan.spatial_dims)
    if param is not None:
        new = new.to(device=param.device, dtype=param.dtype if param.is_floating_point() else None)
        if _frozen(old):
            new.requires_grad_(False)
    new.train(old.training)
    return new


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def _refresh_first_conv(model: nn.Module) -> None:
    """When the layer a timm ``pretrained_cfg``'s ``first_conv`` names went with a replaced block,
    name the model's first registered convolution instead (timm adapts that layer to other input
    channels when it loads weights)."""
    cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(cfg, dict) or not cfg.get("first_conv"):
        return
    try:  # still a convolution of the model: keep it (registration order is not execution order)
        if isinstance(model.get_submodule(cfg["first_conv"]), _CONVS):
            return
    except AttributeError:
        pass
    first = next((name for name, m in model.named_modules() if isinstance(m, _CONVS)), None)
    if first is not None:
        model.pretrained_cfg = {**cfg, "first_conv": first}
        if isinstance(getattr(model, "default_cfg", None), dict):
            model.default_cfg = model.pretrained_cfg


def _swap_all(model, plans, new_modules, example_input, expected_shapes) -> None:
    """Swap every planned module, check the model still runs alike, undo everything if not."""
    done = []
    try:
        for plan, new in zip(plans, new_modules):
            done.append(plan)  # before its paths: one set before a failure is undone too
            for path in plan.paths:  # a block registered twice is one module: one CMRF for both
                _set(model, path, new)
        called = set()
        handles = [new.register_forward_hook(lambda module, args, output: called.add(id(module)))
                   for new in new_modules]
        try:
            shapes = _run(model, example_input)
        finally:
            for handle in handles:
                handle.remove()
        if shapes != expected_shapes:
            raise RuntimeError(f"output shapes changed from {expected_shapes} to {shapes}")
        # The swap rebinds registered modules; a forward that reaches a block some other way (a
        # plain list, a bound method kept from before) would still run the old one.
        idle = [plan.path for plan, new in zip(plans, new_modules) if id(new) not in called]
        if idle:
            raise RuntimeError(
                f"the forward never called the new module at {', '.join(idle)}, so it still runs the "
                f"old blocks through a reference outside the module tree (a plain list or dict, or a "
                f"bound method): register them in an nn.ModuleList/ModuleDict"
            )
    except Exception as err:
        for plan in reversed(done):
            for path in plan.paths:
                _set(model, path, plan.module)
        raise RuntimeError(
            f"replace_blocks undid every swap because {type(model).__name__} no longer runs "
            f"alike after replacing {', '.join(p.path for p in plans)}: {type(err).__name__}: {err}. "
            f"Its forward may depend on the replaced modules' internals; exclude those blocks "
            f"(exclude=[...])"
        ) from err
