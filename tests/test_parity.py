"""`python -m sammed3d_jax.parity` on the bundled golden folder and on every shared one."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from sammed3d_jax.parity import check_folder
from tests.conftest import REPO, golden_folders


def test_bundled_golden_small_matches(fixtures_dir):
    report = check_folder(fixtures_dir / "golden_small")
    ck = report["checkpoints"]["checkpoint_train_format.pth"]
    assert ck["num_parameters"] == 1_351_234
    bad = {n: v for n, v in ck["outputs"].items() if not v["ok"]}
    assert not bad, bad
    # every stored output, intermediates included, was compared
    assert len(ck["outputs"]) == 28
    assert report["ok"]


@pytest.mark.shared
@pytest.mark.parametrize("folder", golden_folders(), ids=lambda p: p.name)
def test_every_shared_golden_folder_passes(folder):
    proc = subprocess.run(
        [sys.executable, "-m", "sammed3d_jax.parity", str(folder)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert summary["ok"]
    for f in summary["folders"]:
        assert f["checkpoints"], f
        for ck in f["checkpoints"].values():
            assert all(v["max_rel"] <= 3e-4 for v in ck["outputs"].values())


def test_parity_fails_loudly_on_a_wrong_model(tmp_path, fixtures_dir):
    """Perturb one weight: the parity command must report failure with exit code 1."""
    import shutil

    import numpy as np

    from sammed3d_jax.convert.pth import find_state_dict, load_pth, save_pth

    folder = tmp_path / "golden"
    folder.mkdir()
    shutil.copy(fixtures_dir / "golden_small" / "io.npz", folder / "io.npz")
    sd, _ = find_state_dict(load_pth(fixtures_dir / "golden_small" / "checkpoint_train_format.pth"))
    sd = dict(sd)
    key = "image_encoder.blocks.0.attn.rel_pos_h"
    sd[key] = sd[key] + np.float32(0.5)
    save_pth(folder / "perturbed.pth", sd)
    proc = subprocess.run(
        [sys.executable, "-m", "sammed3d_jax.parity", str(folder)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    outputs = summary["folders"][0]["checkpoints"]["perturbed.pth"]["outputs"]
    assert outputs["case1_patch_embed_plus_pos"]["ok"]
    assert not outputs["case1_block_0"]["ok"]


def test_damaged_folders_are_reported_and_the_rest_still_run(tmp_path, fixtures_dir, capsys):
    import shutil

    from sammed3d_jax.parity import main

    good = fixtures_dir / "golden_small"
    bad_pth = tmp_path / "bad_pth"
    bad_pth.mkdir()
    shutil.copy(good / "io.npz", bad_pth / "io.npz")
    (bad_pth / "checkpoint.pth").write_bytes(b"not a torch file")
    bad_npz = tmp_path / "bad_npz"
    bad_npz.mkdir()
    shutil.copy(good / "checkpoint_train_format.pth", bad_npz / "checkpoint_train_format.pth")
    (bad_npz / "io.npz").write_bytes((good / "io.npz").read_bytes()[:1000])
    assert main([str(bad_pth), str(bad_npz), str(good)]) == 1
    out, err = capsys.readouterr()
    summary = json.loads(out.strip().splitlines()[-1])
    first, second, third = summary["folders"]
    assert not first["ok"] and "error" in first and not second["ok"] and "error" in second
    assert third["ok"] and "Traceback" not in err
    assert f"error: {bad_pth}" in err and f"error: {bad_npz}" in err


def test_golden_file_without_outputs_fails(tmp_path, fixtures_dir):
    """io.npz holding only inputs compares nothing: that is a failure, not a pass."""
    import shutil

    from sammed3d_jax.parity import GoldenFormatError, check_folder

    folder = tmp_path / "inputs_only"
    folder.mkdir()
    good = fixtures_dir / "golden_small"
    shutil.copy(good / "checkpoint_train_format.pth", folder / "checkpoint_train_format.pth")
    with np.load(good / "io.npz") as z:
        kept = {k: z[k] for k in z.files if k.endswith(("_image", "_points", "_labels"))}
    np.savez(folder / "io.npz", **kept)
    with pytest.raises(GoldenFormatError, match="no reference outputs"):
        check_folder(folder)
