"""Device mesh, logical-axis rules and sharded state creation.

Model code names axes logically: every parameter carries a ``logical_axes`` metadata entry
(``embed``, ``mlp``, ``qkv``, ``heads``, ``conv_in``, ``conv_out``, ``embed_prompt``,
``heads_prompt``, ``norm`` or None per dimension) and large activations are constrained with
`shard(x, ("batch", ...))`. One rules table maps logical names to mesh axes:

    mesh axes   data    pure data parallelism (parameters replicated)
                fsdp    data parallelism with parameters and optimizer state sharded (ZeRO-3)
                tensor  tensor (model) parallelism inside the matmuls

A dimension is only sharded when its size is divisible by the mesh axes it maps to;
otherwise that dimension stays replicated (a 1-channel input conv cannot be split), and an
array left without the fsdp axis gets it on its largest divisible dimension instead.
`jax.jit` with these shardings is the modern spelling of pjit.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.experimental.mesh_utils
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or tuple of axes, or None = replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("embed_prompt", "fsdp"),
    ("mlp", "tensor"),
    ("qkv", "tensor"),
    ("heads", "tensor"),
    ("heads_prompt", "tensor"),
    ("conv_in", "tensor"),
    ("conv_out", "fsdp"),
    ("norm", None),
    ("act_embed", None),
)

_ACTIVE: contextvars.ContextVar[tuple[Mesh, dict[str, Any]] | None] = contextvars.ContextVar(
    "sammed3d_mesh", default=None
)


def mesh_shape(axes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Sizes of (data, fsdp, tensor) with at most one -1 meaning "the rest of the devices"."""
    unknown = [k for k in MESH_AXES if int(axes.get(k, 1)) == -1]
    if len(unknown) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {unknown}")
    sizes = {k: int(axes.get(k, 1)) for k in MESH_AXES}
    extra = set(axes) - set(MESH_AXES)
    if extra:
        raise ValueError(f"unknown mesh axes {sorted(extra)}; known: {MESH_AXES}")
    bad = {k: v for k, v in sizes.items() if v < 1 and v != -1}
    if bad:
        raise ValueError(f"mesh axis sizes must be >= 1 or -1 (the rest), got {bad}")
    known = math.prod(v for k, v in sizes.items() if v != -1)
    if unknown:
        if num_devices % known:
            raise ValueError(f"{num_devices} devices cannot be split into mesh {dict(axes)}")
        sizes[unknown[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(
            f"mesh {sizes} needs {math.prod(sizes.values())} devices but {num_devices} are available"
        )
    return tuple(sizes[k] for k in MESH_AXES)


def make_mesh(axes: Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all (or the given) devices; default all-data."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(axes or {"data": -1}, len(devices))
    try:
        device_array = jax.experimental.mesh_utils.create_device_mesh(shape, devices)
    except Exception as e:  # topologies it does not know, fake CPU devices: row-major layout
        if devices[0].platform == "tpu":  # there the layout decides the collectives' speed
            log.warning("mesh %s: no topology-aware device order (%s); using row-major", shape, e)
        device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES)


def rules_dict(rules: Sequence[tuple[str, Any]] | Mapping[str, Any] | None) -> dict[str, Any]:
    """Logical axis -> mesh axis (a name, a tuple of names, or None) as a dict, checked.

    Raises:
      ValueError: a target that is no mesh axis (a typo would leave its arrays replicated),
        or no ``batch`` rule (every device would compute the whole batch).
    """
    if rules is None:
        return dict(DEFAULT_RULES)
    try:
        items = list(rules.items() if isinstance(rules, Mapping) else rules)
        pairs = [(str(name), target) for name, target in items]
    except (TypeError, ValueError):
        raise ValueError(
            f"sharding_rules must be (logical name, mesh axis) pairs, got {rules!r}"
        ) from None
    out = {}
    for name, target in pairs:
        if isinstance(target, list):
            target = tuple(target)
        names = target if isinstance(target, tuple) else (target,)
        unknown = [n for n in names if n is not None and n not in MESH_AXES]
        if unknown or (isinstance(target, tuple) and None in target):
            raise ValueError(
                f"sharding_rules: {name!r} -> {target!r}: mesh axes are {MESH_AXES} (or None)"
            )
        out[name] = target
    if out.get("batch") is None:
        raise ValueError(
            "sharding_rules: no 'batch' rule to a mesh axis (e.g. ('batch', ('data', 'fsdp'))): "
            "every device would compute the whole batch"
        )
    return out


def _axis_size(mesh: Mesh, target: Any) -> int:
    if target is None:
        return 1
    names = target if isinstance(target, tuple) else (target,)
    return math.prod(mesh.shape[n] for n in names)


def logical_to_spec(
    logical: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Mapping[str, Any],
) -> PartitionSpec:
    """PartitionSpec for one array; non-divisible or repeated mesh axes stay replicated."""
    if not logical:
        return PartitionSpec()
    used: set[str] = set()
    spec = []
    for name, size in zip(logical, shape):
        target = rules.get(name) if name is not None else None
        if target is not None:
            names = target if isinstance(target, tuple) else (target,)
            names = tuple(n for n in names if n not in used and mesh.shape.get(n, 1) > 1)
            target = (names if len(names) > 1 else names[0]) if names else None
        if target is not None and size % _axis_size(mesh, target) == 0:
            spec.append(target)
            used.update(target if isinstance(target, tuple) else (target,))
        else:
            spec.append(None)
    # ZeRO-style fallback: an array whose named dimension cannot take the fsdp axis (not
    # divisible) still gets it on its largest divisible unsharded dimension.
    fsdp = mesh.shape.get("fsdp", 1)
    if fsdp > 1 and "fsdp" not in used:
        free = [i for i, t in enumerate(spec) if t is None and shape[i] % fsdp == 0]
        if free:
            spec[max(free, key=lambda i: shape[i])] = "fsdp"
    return PartitionSpec(*spec)


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def state_specs(state: nnx.State, mesh: Mesh, rules: Any = None) -> Any:
    """A tree of PartitionSpec mirroring an (abstract or concrete) `nnx.State`."""
    r = rules_dict(rules)

    def spec(v: Any) -> Any:
        if _is_var(v):
            logical = v.get_metadata().get("logical_axes")
            return v.replace(logical_to_spec(logical, np.shape(v.get_value()), mesh, r))
        return logical_to_spec(None, np.shape(v), mesh, r)

    return jax.tree_util.tree_map(spec, state, is_leaf=_is_var)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Any = None) -> Any:
    """A tree of NamedSharding mirroring an `nnx.State`."""
    specs = state_specs(state, mesh, rules)
    return jax.tree_util.tree_map(
        lambda s: (
            s.replace(NamedSharding(mesh, s.get_value())) if _is_var(s) else NamedSharding(mesh, s)
        ),
        specs,
        is_leaf=lambda x: _is_var(x) or isinstance(x, PartitionSpec),
    )


def batch_sharding(mesh: Mesh, ndim: int, rules: Any = None) -> NamedSharding:
    """Sharding of a (B, ...) batch: batch over the data-parallel axes, rest replicated."""
    target = rules_dict(rules).get("batch")
    return NamedSharding(mesh, PartitionSpec(target, *([None] * (ndim - 1))))


def check_batch_divisible(mesh: Mesh, batch_size: int, name: str, rules: Any = None) -> None:
    """Raise ValueError unless ``batch_size`` splits evenly over the batch's mesh axes."""
    target = rules_dict(rules).get("batch")
    axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    n = math.prod(mesh.shape[a] for a in axes)
    if batch_size % n:
        raise ValueError(
            f"{name}={batch_size} does not split over the {n} devices of the batch's mesh axes "
            f"{dict((a, mesh.shape[a]) for a in axes)}; use a multiple of {n}"
        )


def batch_shard_from_rows(
    rows_by_process: Mapping[int, set[tuple[int, int]]], process: int, batch_size: int
) -> tuple[int, int]:
    """(shard index, shard count) of `process`, from the batch rows ``[start, stop)`` each
    process's devices hold.

    Processes holding the same rows (the batch axes do not span them) form one shard and
    load the same samples; the shards, ordered by their first row, must partition the batch
    into equal parts. A shard's rows need not be adjacent (on TPU pods the device mesh
    interleaves hosts): JAX fills them with the process's samples in ascending order.
    """
    groups = sorted({frozenset(r) for r in rows_by_process.values()}, key=min)
    covered = sorted(row for g in groups for start, stop in g for row in range(start, stop))
    sizes = {sum(stop - start for start, stop in g) for g in groups}
    if covered != list(range(batch_size)) or len(sizes) != 1:
        raise ValueError(
            f"the processes' batch rows {[sorted(g) for g in groups]} do not split a batch of "
            f"{batch_size} into equal parts"
        )
    return groups.index(frozenset(rows_by_process[process])), len(groups)


def process_batch_shard(mesh: Mesh, batch_size: int, rules: Any = None) -> tuple[int, int]:
    """Which part of each global batch this process loads: ``(index, count)``.

    The batch is split over the batch's mesh axes only, so when those do not span every
    process (e.g. a tensor axis across hosts) several processes hold the same rows and must
    load the same samples; splitting the data by ``jax.process_index()`` would give each of
    them different ones.
    """
    sharding = batch_sharding(mesh, 1, rules)
    rows: dict[int, set[tuple[int, int]]] = {}
    for dev, idx in sharding.devices_indices_map((batch_size,)).items():
        rows.setdefault(dev.process_index, set()).add(tuple(idx[0].indices(batch_size)[:2]))
    me = jax.process_index()
    if me not in rows:
        raise ValueError(f"process {me} holds no device of the mesh {dict(mesh.shape)}")
    return batch_shard_from_rows(rows, me, batch_size)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Any = None) -> Iterator[Mesh]:
    """Activate `mesh` for `shard()` constraints inside the model (no-op outside)."""
    token = _ACTIVE.set((mesh, rules_dict(rules)))
    try:
        yield mesh
    finally:
        _ACTIVE.reset(token)


def shard(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """Constrain an activation to its logical sharding; a no-op when no mesh is active."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = logical_to_spec(logical, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def optimizer_shardings(abstract_opt_state: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for an optimizer state: each leaf that mirrors a parameter (Adam moments,
    whatever wrappers such as `multi_transform` put around them) takes that parameter's
    sharding, matched by key-path suffix and shape; everything else (counters) is replicated.
    """
    by_path = {}
    for path, s in jax.tree_util.tree_leaves_with_path(
        param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding)
    ):
        by_path[jax.tree_util.keystr(path)] = s
    suffixes = sorted(by_path, key=len, reverse=True)
    repl = replicated(mesh)

    def pick(path: Any, leaf: Any) -> NamedSharding:
        key = jax.tree_util.keystr(path)
        for suffix in suffixes:
            if key.endswith(suffix):
                s = by_path[suffix]
                if len(s.spec) <= len(getattr(leaf, "shape", ())):
                    return s
        return repl

    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def init_optimizer_state(tx: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """`tx.init(params)` created directly with the shardings of `optimizer_shardings`."""
    abstract = jax.eval_shape(tx.init, params)
    out_sh = optimizer_shardings(abstract, param_shardings, mesh)
    return jax.jit(tx.init, out_shardings=out_sh)(params)


def to_mesh(tree: Any, mesh: Mesh) -> Any:
    """Replicate over `mesh` every array that lives on other devices (e.g. scalar counters
    created by an optimizer's init on one device); sharded arrays are left as they are."""
    devices = set(mesh.devices.flat)

    def fix(x: Any) -> Any:
        if isinstance(x, jax.Array) and set(x.sharding.device_set) != devices:
            return jax.device_put(np.asarray(x), replicated(mesh))
        return x

    return jax.tree_util.tree_map(fix, tree)


def nbytes_per_device(tree: Any) -> int:
    """Bytes of the addressable shards held by one device (the first), summed over leaves."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        if isinstance(leaf, jax.Array):  # from the sharding alone: no shard data is touched
            total += int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
    return total


def replicated_large_arrays(tree: Any, min_bytes: int = 1 << 20) -> list[str]:
    """Paths of arrays of at least `min_bytes` that are fully replicated."""
    bad = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if isinstance(leaf, jax.Array) and leaf.nbytes >= min_bytes:
            if leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) > 1:
                bad.append(jax.tree_util.keystr(path))
    return bad
