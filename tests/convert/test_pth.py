"""Tests for sammed3d_jax.convert.pth: torch-free reading and writing of .pth checkpoints."""

from __future__ import annotations

import argparse
import collections
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from sammed3d_jax.convert.pth import (
    Namespace,
    PthCorruptError,
    PthError,
    PthLegacyFormatError,
    PthNotFoundError,
    TorchDevice,
    TorchDtype,
    UnsafePickleError,
    find_state_dict,
    load_pth,
    save_pth,
)

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("SAMMED3D_SHARED", REPO / ".." / "shared"))
GOLDEN_SMALL = SHARED / "golden" / "small"
FIXTURE_CHECKPOINT = REPO / "tests" / "fixtures" / "golden_small" / "checkpoint_train_format.pth"


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _torch():
    return pytest.importorskip("torch")


def _tensor_bytes(t: Any) -> np.ndarray:
    """A torch tensor's elements (C order, conj/neg resolved) as raw bytes."""
    torch = _torch()
    t = t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)


def assert_same(ours: Any, ref: Any, where: str = "obj") -> None:
    """Compare what load_pth returned with what torch.load returned, recursively."""
    torch = _torch()
    if isinstance(ref, torch.Tensor):
        assert isinstance(ours, np.ndarray), where
        assert ours.dtype.name == str(ref.dtype).removeprefix("torch."), where
        assert ours.shape == tuple(ref.shape), where
        assert ours.flags.c_contiguous, where
        mine = np.ascontiguousarray(ours).reshape(-1).view(np.uint8)
        np.testing.assert_array_equal(mine, _tensor_bytes(ref), err_msg=where)
    elif isinstance(ref, argparse.Namespace):
        assert isinstance(ours, Namespace), where
        assert_same(vars(ours), vars(ref), where)
    elif isinstance(ref, torch.device):
        assert isinstance(ours, TorchDevice), where
        assert str(ours) == str(ref), where
    elif isinstance(ref, torch.dtype):
        assert ours == TorchDtype(str(ref).removeprefix("torch.")), where
    elif isinstance(ref, dict):
        assert type(ours) is type(ref), where
        assert list(ours) == list(ref), where
        for k in ref:
            assert_same(ours[k], ref[k], f"{where}[{k!r}]")
    elif isinstance(ref, list | tuple):
        assert type(ours) is type(ref), where
        assert len(ours) == len(ref), where
        for i, (a, b) in enumerate(zip(ours, ref)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(ref, np.ndarray):
        assert isinstance(ours, np.ndarray) and ours.dtype == ref.dtype, where
        np.testing.assert_array_equal(ours, ref, err_msg=where)
    else:
        assert type(ours) is type(ref), f"{where}: {type(ours)} vs {type(ref)}"
        assert ours == ref, where


def _torch_save_and_compare(tmp_path: Path, obj: Any, name: str = "x.pth") -> Any:
    torch = _torch()
    path = tmp_path / name
    torch.save(obj, path)
    ours = load_pth(path)
    assert_same(ours, torch.load(path, weights_only=False))
    return ours


def _write_zip(path: Path, records: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in records.items():
            zf.writestr(name, data)


def _records(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def _example_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "f32": rng.standard_normal((3, 4)).astype(np.float32),
        "f16": rng.standard_normal((2, 5)).astype(np.float16),
        "bf16": rng.standard_normal((7,)).astype(ml_dtypes.bfloat16),
        "f64": rng.standard_normal((2, 1, 3)),
        "i64": rng.integers(-(2**40), 2**40, (4,)),
        "i32": rng.integers(-100, 100, (2, 2)).astype(np.int32),
        "u8": rng.integers(0, 255, (5,)).astype(np.uint8),
        "bool": rng.random((3, 3)) > 0.5,
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 3), np.float32),
        "strided": np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2].T,
        "big_endian": np.arange(5, dtype=">f4"),
    }


# --------------------------------------------------------------------------------------------
# torch.save -> load_pth
# --------------------------------------------------------------------------------------------


@pytest.mark.torch
def test_dtypes_round_trip_from_torch(tmp_path: Path) -> None:
    torch = _torch()
    gen = torch.Generator().manual_seed(0)
    dtypes = [
        torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
        torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128,
        torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2,
    ]  # fmt: skip
    obj = {}
    for dt in dtypes:
        x = torch.randn(3, 4, generator=gen, dtype=torch.float64) * 50
        if dt.is_complex:
            obj[str(dt)] = torch.complex(x, -x).to(dt)
        elif dt == torch.bool:
            obj[str(dt)] = x > 0
        elif not dt.is_floating_point:
            obj[str(dt)] = x.abs().to(dt) if "uint" in str(dt) else x.to(dt)
        else:
            obj[str(dt)] = x.to(dt)
    ours = _torch_save_and_compare(tmp_path, obj)
    assert ours["torch.bfloat16"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(
        ours["torch.bfloat16"].astype(np.float32), obj["torch.bfloat16"].float().numpy()
    )


@pytest.mark.torch
def test_views_offsets_shared_storage_scalars_parameters(tmp_path: Path) -> None:
    torch = _torch()
    base = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5)
    tagged = torch.ones(2)
    tagged.note = "tensor attributes are dropped"
    obj = collections.OrderedDict(
        base=base,
        offset_view=base[1, 1:3],  # offset into the shared storage
        transposed=base.permute(2, 0, 1),
        strided=base[:, ::2, 1::3],
        expanded=torch.ones(3, 1).expand(3, 4),  # stride 0
        zero_d=torch.tensor(3.5),
        zero_d_int=torch.tensor(7),
        empty=torch.zeros(0, 3),
        param=torch.nn.Parameter(torch.randn(2, 3)),
        requires_grad=torch.ones(2, requires_grad=True),
        conj=torch.tensor([1 + 2j, 3 - 1j]).conj(),
        tagged=tagged,
        half_view=torch.arange(10, dtype=torch.float16)[3:7],
    )
    ours = _torch_save_and_compare(tmp_path, obj)
    assert ours["offset_view"].tolist() == [[25.0, 26.0, 27.0, 28.0, 29.0], [30, 31, 32, 33, 34]]
    # tensors sharing one storage come back as independent copies
    ours["base"][0, 0, 0] = -1
    assert ours["transposed"][0, 0, 0] == 0
    assert ours["zero_d"].shape == () and ours["zero_d"].dtype == np.float32


@pytest.mark.torch
def test_training_checkpoint(tmp_path: Path) -> None:
    torch = _torch()
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = torch.optim.AdamW(model.parameters(), lr=8e-5, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[120, 180], gamma=0.1)
    model(torch.ones(2, 3)).square().sum().backward()
    opt.step()
    sched.step()
    args = argparse.Namespace(
        task_name="union_train",
        img_size=128,
        device=torch.device("cuda", 0),
        cpu=torch.device("cpu"),
        multi_gpu=False,
        lr_scheduler="multisteplr",
        step_size=[120, 180],
        dtype=torch.float32,
    )
    ckpt = {
        "epoch": 3,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": opt.state_dict(),
        "lr_scheduler_state_dict": sched.state_dict(),
        "losses": [0.9, 0.5],
        "dices": [np.float64(0.25), np.float64(0.5)],
        "best_loss": 0.5,
        "best_dice": float(np.float64(0.5)),
        "args": args,
        "used_datas": ["/data/a", "/data/b"],
    }
    ours = _torch_save_and_compare(tmp_path, ckpt, "sam_model_latest.pth")
    assert ours["args"].img_size == 128
    assert ours["args"].device == TorchDevice("cuda", 0) and str(ours["args"].device) == "cuda:0"
    assert ours["args"].dtype.numpy == np.float32
    assert vars(ours["args"])["task_name"] == "union_train"
    assert ours["lr_scheduler_state_dict"]["milestones"] == collections.Counter({120: 1, 180: 1})
    assert type(ours["dices"][0]) is np.float64 and ours["dices"][1] == 0.5
    state = ours["optimizer_state_dict"]["state"]
    assert state[0]["step"].shape == () and float(state[0]["step"]) == 1.0
    assert ours["optimizer_state_dict"]["param_groups"][0]["betas"] == (0.9, 0.999)
    weights, where = find_state_dict(ours)
    assert where == "checkpoint['model_state_dict']"
    assert list(weights) == ["0.weight", "0.bias", "1.weight", "1.bias"]


@pytest.mark.torch
def test_numpy_arrays_and_builtins_inside_checkpoint(tmp_path: Path) -> None:
    torch = _torch()
    obj = {
        "arr": np.arange(6, dtype=np.int32).reshape(2, 3),
        "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "in_tuple": (np.ones(2, np.float16), [np.zeros(1, ">f8")]),
        "str": np.str_("abc"),
        "bool": np.bool_(True),
        "set": {1, 2},
        "frozen": frozenset({"a"}),
        "bytes": b"\x00\xffraw",
        "empty_bytes": b"",
        "bytearray": bytearray(b"xy"),
        "complex": 1 + 2j,
        "slice": slice(1, None, 2),
        "size": torch.Size([2, 3]),
    }
    path = tmp_path / "np.pth"
    torch.save(obj, path)
    ours = load_pth(path)
    ref = torch.load(path, weights_only=False)
    for key in ("arr", "fortran"):
        assert_same(ours[key], ref[key])
    assert ours["in_tuple"][0].dtype == np.float16
    np.testing.assert_array_equal(ours["in_tuple"][1][0], np.zeros(1))
    assert ours["size"] == (2, 3)
    for key in ("str", "bool", "set", "frozen", "bytes", "empty_bytes", "bytearray", "complex"):
        assert ours[key] == ref[key] and type(ours[key]) is type(ref[key]), key
    assert ours["slice"] == slice(1, None, 2)


@pytest.mark.torch
def test_ddp_prefixed_keys_are_kept(tmp_path: Path) -> None:
    torch = _torch()
    sd = collections.OrderedDict(
        [("module.image_encoder.pos_embed", torch.zeros(1, 2)), ("module.x.bias", torch.ones(2))]
    )
    ours = _torch_save_and_compare(tmp_path, sd)
    weights, where = find_state_dict(ours)
    assert list(weights) == list(sd) and where == "top level"


@pytest.mark.torch
@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_legacy_format_is_refused(tmp_path: Path, protocol: int) -> None:
    torch = _torch()
    path = tmp_path / "legacy.pth"
    torch.save(
        {"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False, pickle_protocol=protocol
    )
    with pytest.raises(PthLegacyFormatError, match=r"torch >= 1\.6") as info:
        load_pth(path)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------------------------
# save_pth
# --------------------------------------------------------------------------------------------


def test_save_pth_round_trip_without_torch(tmp_path: Path) -> None:
    arrays = _example_arrays()
    obj = collections.OrderedDict(
        weights=collections.OrderedDict(arrays),
        meta={"epoch": 2, "lr": 1e-4, "name": "x", "none": None, "flag": True},
        seq=[1, (2.5, "b"), [np.float64(0.5)]],
    )
    path = tmp_path / "out.pth"
    save_pth(path, obj)
    back = load_pth(path)
    assert (
        type(back) is collections.OrderedDict and type(back["weights"]) is collections.OrderedDict
    )
    for key, arr in arrays.items():
        got = back["weights"][key]
        assert got.shape == arr.shape and got.dtype == arr.dtype.newbyteorder("="), key
        np.testing.assert_array_equal(got, arr, err_msg=key)
    assert back["meta"] == obj["meta"]
    assert back["seq"] == [1, (2.5, "b"), [0.5]] and type(back["seq"][2][0]) is float
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pth"]
    # every storage record starts on a 64-byte boundary, as torch writes them
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if "/data/" in info.filename:
                start = info.header_offset + 30 + len(info.filename) + len(info.extra)
                assert start % 64 == 0, info.filename


def test_save_pth_overwrites_atomically_and_cleans_up_on_error(tmp_path: Path) -> None:
    path = tmp_path / "w.pth"
    save_pth(path, {"a": np.ones(3, np.float32)})
    save_pth(path, {"a": np.zeros(2, np.float32)})
    assert load_pth(path)["a"].tolist() == [0.0, 0.0]
    with pytest.raises(TypeError, match=r"obj\['bad'\]"):
        save_pth(path, {"bad": object()})
    with pytest.raises(TypeError, match="dtype object"):
        save_pth(path, {"bad": np.array([None])})
    assert load_pth(path)["a"].tolist() == [0.0, 0.0]
    assert [p.name for p in tmp_path.iterdir()] == ["w.pth"]


@pytest.mark.torch
def test_save_pth_loads_in_torch_weights_only(tmp_path: Path) -> None:
    torch = _torch()
    arrays = _example_arrays()
    arrays["u16"] = np.arange(4, dtype=np.uint16)
    arrays["f8"] = np.array([0.5, -2.0], dtype=ml_dtypes.float8_e4m3fn)
    arrays["c64"] = np.array([1 + 2j], np.complex64)
    obj = {
        "state": collections.OrderedDict(arrays),
        "epoch": 4,
        "hist": [0.5, 0.25],
        "pair": (1, "a"),
        "none": None,
    }
    path = tmp_path / "for_torch.pth"
    save_pth(path, obj)
    loaded = torch.load(path, weights_only=True)
    assert type(loaded["state"]) is collections.OrderedDict
    for key, arr in arrays.items():
        t = loaded["state"][key]
        assert str(t.dtype).removeprefix("torch.") == arr.dtype.name, key
        assert tuple(t.shape) == arr.shape, key
        want = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"))).reshape(-1)
        np.testing.assert_array_equal(_tensor_bytes(t), want.view(np.uint8), err_msg=key)
    assert loaded["epoch"] == 4 and loaded["hist"] == [0.5, 0.25] and loaded["pair"] == (1, "a")
    assert loaded["none"] is None
    mapped = torch.load(path, weights_only=True, mmap=True)
    assert torch.equal(mapped["state"]["f32"], torch.from_numpy(arrays["f32"]))


@pytest.mark.torch
def test_medim_state_dict_through_save_pth(tmp_path: Path) -> None:
    torch = _torch()
    medim = pytest.importorskip("medim")
    model = medim.create_model("SAM-Med3D", pretrained=False)
    sd = model.state_dict()
    path = tmp_path / "sam_med3d.pth"
    save_pth(path, collections.OrderedDict((k, v.numpy()) for k, v in sd.items()))
    assert [p.name for p in tmp_path.iterdir()] == ["sam_med3d.pth"]
    loaded = torch.load(path, weights_only=True)
    assert list(loaded) == list(sd)
    for key, value in loaded.items():
        assert value.dtype == sd[key].dtype and torch.equal(value, sd[key]), key
    model.load_state_dict(loaded, strict=True)


# --------------------------------------------------------------------------------------------
# Malicious pickles
# --------------------------------------------------------------------------------------------


class _Reduce:
    """Pickles as a call of ``fn(*args)``."""

    def __init__(self, fn: Any, *args: Any) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.fn, self.args


def _malicious_payloads(marker: Path) -> dict[str, Any]:
    return {
        "os.system": _Reduce(os.system, f"touch {marker}"),
        "eval": _Reduce(eval, f"__import__('os').system('touch {marker}')"),
        "subprocess.Popen": _Reduce(subprocess.Popen, ["touch", str(marker)]),
    }


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("payload", ["os.system", "eval", "subprocess.Popen"])
def test_malicious_pickle_is_refused_without_torch(
    tmp_path: Path, payload: str, protocol: int
) -> None:
    marker = tmp_path / "pwned"
    obj = {"weights": {"w": 1}, "hook": _malicious_payloads(marker)[payload]}
    path = tmp_path / "evil.pth"
    _write_zip(path, {"evil/data.pkl": pickle.dumps(obj, protocol=protocol)})
    with pytest.raises(UnsafePickleError) as info:
        load_pth(path)
    message = str(info.value)
    expected = {
        "os.system": ("os.system", "posix.system", "nt.system"),
        "eval": ("builtins.eval",),
        "subprocess.Popen": ("subprocess.Popen",),
    }[payload]
    assert any(name in message for name in expected), message
    assert str(path) in message
    assert not marker.exists()


@pytest.mark.torch
def test_malicious_torch_save_is_refused(tmp_path: Path) -> None:
    torch = _torch()
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.ones(2), "x": _malicious_payloads(marker)["os.system"]}, path)
    with pytest.raises(UnsafePickleError, match=r"(os|posix|nt)\.system"):
        load_pth(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "global_line",
    [b"torch\nFloatStorage\n", b"argparse\nNamespace\n", b"torch._utils\n_rebuild_tensor_v2\n"],
)
@pytest.mark.parametrize("state", [{"dtype": 1, "a": 1}, (None, {"dtype": 1, "a": 1})])
def test_pickle_cannot_mutate_allowed_globals(
    tmp_path: Path, global_line: bytes, state: Any
) -> None:
    # PROTO 2, GLOBAL <allowed global>, <state>, BUILD, STOP: BUILD would write the state
    # into the object that find_class handed out, and so into every later load.
    data = b"\x80\x02c" + global_line + pickle.dumps(state, protocol=2)[2:-1] + b"b."
    path = tmp_path / "mutate.pth"
    _write_zip(path, {"m/data.pkl": data})
    with pytest.raises(PthCorruptError, match=r"mutate\.pth"):
        load_pth(path)
    good = tmp_path / "good.pth"
    save_pth(good, {"w": np.arange(3, dtype=np.float32), "n": [1]})
    back = load_pth(good)
    assert back["w"].dtype == np.float32 and back["w"].tolist() == [0.0, 1.0, 2.0]
    assert not hasattr(Namespace, "a") and not hasattr(Namespace, "dtype")


# --------------------------------------------------------------------------------------------
# Damaged and foreign files
# --------------------------------------------------------------------------------------------


@pytest.fixture()
def small_pth(tmp_path: Path) -> Path:
    path = tmp_path / "small.pth"
    rng = np.random.default_rng(1)
    save_pth(
        path,
        {f"layer{i}.weight": rng.standard_normal((64, 64)).astype(np.float32) for i in range(4)},
    )
    return path


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.pth"
    with pytest.raises(PthNotFoundError, match=r"nope\.pth"):
        load_pth(path)


@pytest.mark.parametrize(
    "content",
    [b"", b"\x00" * 10, np.random.default_rng(3).bytes(4096), b"PK\x03\x04" + b"\x00" * 100],
    ids=["empty", "zeros", "random", "zip_header_only"],
)
def test_not_a_checkpoint(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "junk.pth"
    path.write_bytes(content)
    with pytest.raises(PthError) as info:
        load_pth(path)
    assert str(path) in str(info.value)


def test_truncated_file(tmp_path: Path, small_pth: Path) -> None:
    data = small_pth.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 100):
        path = tmp_path / f"cut{cut}.pth"
        path.write_bytes(data[:cut])
        with pytest.raises(PthCorruptError, match=f"cut{cut}.pth"):
            load_pth(path)


def test_crc_error(tmp_path: Path, small_pth: Path) -> None:
    data = bytearray(small_pth.read_bytes())
    with zipfile.ZipFile(small_pth) as zf:
        info = zf.getinfo("small/data/1")
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + 5] ^= 0xFF
    path = tmp_path / "crc.pth"
    path.write_bytes(bytes(data))
    with pytest.raises(PthCorruptError, match=r"crc\.pth.*small/data/1"):
        load_pth(path)


def test_zip_without_data_pkl(tmp_path: Path) -> None:
    path = tmp_path / "arrays.npz"
    np.savez(path, a=np.ones(3))
    with pytest.raises(PthCorruptError, match=r"arrays\.npz.*no data\.pkl"):
        load_pth(path)


def test_missing_and_short_storage_records(tmp_path: Path, small_pth: Path) -> None:
    records = _records(small_pth)
    missing = tmp_path / "missing.pth"
    _write_zip(missing, {k: v for k, v in records.items() if k != "small/data/2"})
    with pytest.raises(PthCorruptError, match=r"missing\.pth.*small/data/2.*missing"):
        load_pth(missing)
    short = tmp_path / "short.pth"
    _write_zip(short, {**records, "small/data/2": records["small/data/2"][:100]})
    with pytest.raises(PthCorruptError, match=r"short\.pth.*data/'?2"):
        load_pth(short)


def test_tensor_larger_than_its_storage(tmp_path: Path, small_pth: Path) -> None:
    records = _records(small_pth)
    # claim 65 rows of 64 where the storage holds 64 x 64 elements
    pkl = records["small/data.pkl"].replace(b"K@K@\x86", b"KAK@\x86", 1)
    assert pkl != records["small/data.pkl"]
    path = tmp_path / "oversized.pth"
    _write_zip(path, {**records, "small/data.pkl": pkl})
    with pytest.raises(PthCorruptError, match=r"oversized\.pth.*needs 4160"):
        load_pth(path)


def test_truncated_pickle(tmp_path: Path, small_pth: Path) -> None:
    records = _records(small_pth)
    path = tmp_path / "badpickle.pth"
    _write_zip(path, {**records, "small/data.pkl": records["small/data.pkl"][:-40]})
    with pytest.raises(PthCorruptError, match=r"badpickle\.pth.*unpickle"):
        load_pth(path)


def test_big_endian_archive(tmp_path: Path) -> None:
    arrays = {"f": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3),
              "bf": np.array([1.5, -3.0, 0.1], ml_dtypes.bfloat16),
              "c": np.array([1 + 2j, -3j], np.complex64),
              "i": np.array([1, -2, 2**40])}  # fmt: skip
    little = tmp_path / "le.pth"
    save_pth(little, arrays)
    records = _records(little)
    swapped = {}
    for name, data in records.items():
        if "/data/" in name:
            key = {str(i): k for i, k in enumerate(arrays)}[name.rsplit("/", 1)[1]]
            data = arrays[key].byteswap().tobytes()
        swapped[name.replace("le/", "be/")] = b"big" if name.endswith("byteorder") else data
    big = tmp_path / "be.pth"
    _write_zip(big, swapped)
    back = load_pth(big)
    for key, arr in arrays.items():
        assert back[key].dtype == arr.dtype and back[key].dtype.isnative
        np.testing.assert_array_equal(back[key], arr, err_msg=key)


def test_find_state_dict_errors() -> None:
    with pytest.raises(PthError, match=r"top-level keys: 'epoch', 'args'"):
        find_state_dict({"epoch": 1, "args": Namespace()}, path="ckpt.pth")
    with pytest.raises(PthError, match=r"ckpt\.pth"):
        find_state_dict({"epoch": 1}, path="ckpt.pth")
    with pytest.raises(PthError, match="list"):
        find_state_dict([np.ones(1)])
    sd = {"w": np.ones(1)}
    assert find_state_dict({"state_dict": sd, "epoch": 1}) == (sd, "checkpoint['state_dict']")
    assert find_state_dict({"model": sd}) == (sd, "checkpoint['model']")


# --------------------------------------------------------------------------------------------
# Golden files
# --------------------------------------------------------------------------------------------


@pytest.mark.shared
@pytest.mark.torch
@pytest.mark.parametrize("name", ["state_dict.pth", "checkpoint_train_format.pth"])
def test_golden_small_matches_torch(name: str) -> None:
    torch = _torch()
    path = GOLDEN_SMALL / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    ours = load_pth(path)
    assert_same(ours, torch.load(path, weights_only=False))
    weights, _ = find_state_dict(ours)
    assert len(weights) == 189


@pytest.mark.shared
def test_golden_small_truncated(tmp_path: Path) -> None:
    path = GOLDEN_SMALL / "state_dict.pth"
    if not path.exists():
        pytest.skip(f"{path} not present")
    data = path.read_bytes()
    cut = tmp_path / "state_dict_half.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(PthCorruptError, match=r"state_dict_half\.pth"):
        load_pth(cut)


@pytest.mark.parametrize(
    "path",
    [FIXTURE_CHECKPOINT, GOLDEN_SMALL / "checkpoint_train_format.pth"],
    ids=["fixture", "shared"],
)
def test_golden_checkpoint_without_torch(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path} not present")
    ckpt = load_pth(path)
    weights, where = find_state_dict(ckpt)
    assert where == "checkpoint['model_state_dict']"
    assert len(weights) == 189
    assert weights["image_encoder.pos_embed"].shape == (1, 4, 4, 4, 96)
    assert weights["image_encoder.pos_embed"].dtype == np.float32
    assert ckpt["args"].img_size == 64 and ckpt["args"].model_type == "small"
    assert ckpt["epoch"] == 1 and ckpt["best_loss"] == 1.0


def test_module_does_not_import_torch(tmp_path: Path) -> None:
    code = (
        "import sys, numpy as np\n"
        "from sammed3d_jax.convert.pth import load_pth, save_pth\n"
        f"save_pth({str(tmp_path / 'a.pth')!r}, {{'w': np.ones(2, np.float32)}})\n"
        f"assert load_pth({str(tmp_path / 'a.pth')!r})['w'].tolist() == [1.0, 1.0]\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_loaded_arrays_are_plain_writable_numpy(tmp_path: Path) -> None:
    path = tmp_path / "p.pth"
    save_pth(path, {"a": np.arange(4, dtype=np.float32)})
    arr = load_pth(path)["a"]
    assert type(arr) is np.ndarray and arr.flags.writeable and arr.flags.c_contiguous
    arr += 1
    assert arr.tolist() == [1.0, 2.0, 3.0, 4.0]
