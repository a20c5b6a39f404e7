"""Shared test fixtures: locations of the bundled fixtures and of the optional shared folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"


def shared_root() -> Path | None:
    """The shared golden/data folder: $SAMMED3D_SHARED, else ../shared next to the repo."""
    env = os.environ.get("SAMMED3D_SHARED")
    path = Path(env) if env else REPO.parent / "shared"
    return path if path.is_dir() else None


@pytest.fixture(scope="session", autouse=True)
def subprocess_compilation_cache(tmp_path_factory):
    """A persistent compilation cache shared by the `train.py` runs the tests start.

    Set once this process's JAX has read its configuration, so only child processes use it:
    a run that repeats another's configuration (a resumed or restarted run) loads the
    compiled step instead of compiling it again.
    """
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        yield
        return
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
    try:
        yield
    finally:
        os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    root = shared_root()
    if root is None:
        pytest.skip("shared folder (../shared or $SAMMED3D_SHARED) not present")
    return root


def golden_folders() -> list[Path]:
    """Every golden model folder (io.npz plus weights) under the shared folder."""
    root = shared_root()
    if root is None:
        return []
    return sorted(p.parent for p in (root / "golden").glob("*/io.npz"))


def randomize_params(module, seed: int, scale: float = 0.3):
    """Fill every parameter of an nnx module with N(0, scale²) draws (in place; returns it)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    state = nnx.state(module)
    rng = np.random.default_rng(seed)
    pure = jax.tree_util.tree_map(
        lambda x: jnp.asarray(rng.standard_normal(x.shape).astype(np.float32) * scale),
        nnx.to_pure_dict(state),
    )
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(module, state)
    return module
