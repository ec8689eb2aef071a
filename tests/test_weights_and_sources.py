"""Weights on disk (safetensors, .pt, wrapper prefixes, mismatches) and source batches, without Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kd_ray.core.columns import ID, X, Y
from kd_ray.data.sources import standardize
from kd_ray.models import convnet, mlp, weights


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_round_trip(tmp_path, suffix):
    src, dst = mlp(hidden=8, depth=1), mlp(hidden=8, depth=1)
    path = str(tmp_path / f"w{suffix}")
    if suffix == ".pt":
        torch.save({"state_dict": src.state_dict()}, path)  # a common training-script layout
    else:
        weights.save(src.state_dict(), path)
    weights.load_into(dst, path)
    for a, b in zip(src.state_dict().values(), dst.state_dict().values()):
        assert torch.equal(a, b)


def test_ddp_and_compile_prefixes_are_dropped(tmp_path):
    src = mlp(hidden=8, depth=1)
    prefixed = {f"_orig_mod.module.{k}": v for k, v in src.state_dict().items()}
    path = str(tmp_path / "w.safetensors")
    weights.save(prefixed, path)
    assert all(not k.startswith(("_orig_mod", "module")) for k in weights.file_shapes(path))
    weights.load_into(mlp(hidden=8, depth=1), path)


def test_mismatch_names_the_tensors(tmp_path):
    path = str(tmp_path / "w.safetensors")
    weights.save(mlp(hidden=8, depth=1).state_dict(), path)
    with pytest.raises(weights.WeightsError) as info:
        weights.load_into(mlp(hidden=16, depth=1), path)
    msg = str(info.value)
    assert "shape mismatch" in msg and "1.weight (8, 64) != (16, 64)" in msg
    with pytest.raises(weights.WeightsError) as info:
        weights.load_into(convnet(width=4, blocks=1), path)
    assert "missing" in str(info.value) and "unexpected" in str(info.value)


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    weights.save(mlp(hidden=8, depth=1).state_dict(), str(path))
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temporary left behind
    old = path.read_bytes()

    # A write cut off mid-way (half the bytes out, then the process fails) leaves the old file whole.
    import safetensors.torch

    def half_then_fail(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(safetensors.torch.save(tensors, metadata=metadata)[:100])
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        weights.save(mlp(hidden=16, depth=1).state_dict(), str(path))
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_write_bytes_is_whole_or_not_at_all(tmp_path, monkeypatch):
    """kd_ray's one atomic write: until the rename, readers see the old file; a write that never
    reaches the rename leaves the old file whole and no temporary behind."""
    from kd_ray.core import storage

    path = tmp_path / "summary.json"
    storage.write_bytes(str(path), b"old")

    def crash(src, dst):
        assert path.read_bytes() == b"old"  # the new bytes are all out, under another name
        raise OSError("killed before the rename")

    monkeypatch.setattr(storage.os, "replace", crash)
    with pytest.raises(OSError, match="killed"):
        storage.write_bytes(str(path), b"new" * 1000)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    monkeypatch.undo()
    storage.write_bytes(str(path), b"new")
    assert path.read_bytes() == b"new"


def test_standardize_lists_and_tensors():
    flat = np.arange(2 * 64, dtype=np.float64).reshape(2, 64)
    as_lists = np.empty(2, dtype=object)
    as_lists[0], as_lists[1] = flat[0], flat[1]
    for features in (as_lists, flat, flat.reshape(2, 1, 8, 8)):
        batch = {"f": features, "label": np.array([3, 4]), "row_hash": np.array([2**63 + 5, 7], dtype=np.uint64)}
        out = standardize(batch, "f", "label", None, [1, 8, 8])
        assert out[X].shape == (2, 1, 8, 8) and out[X].dtype == np.float32
        assert out[Y].dtype == np.int64 and out[ID].dtype == np.int64
        np.testing.assert_array_equal(out[X].reshape(2, 64), flat)
    # a user id column wins over the row hash
    out = standardize({"f": flat, "label": np.array([1, 2]), "sid": np.array([10, 11])}, "f", "label", "sid", None)
    assert out[ID].tolist() == [10, 11] and out[X].shape == (2, 64)


def test_builtin_digits_are_scikit_learns():
    """builtin:digits reads scikit-learn's bundled file itself; it must be what load_digits gives."""
    from sklearn.datasets import load_digits

    from kd_ray.data.sources import load_builtin

    x, y = load_digits(return_X_y=True)
    digits = load_builtin("digits")
    assert digits.x.dtype == np.float32 and digits.y.dtype == np.int64
    np.testing.assert_array_equal(digits.x, x.astype(np.float32))
    np.testing.assert_array_equal(digits.y, y)
