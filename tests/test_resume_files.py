"""Checkpoint files, their checks, and resume compatibility: real files and models, no Ray."""

from __future__ import annotations

import json
import os

import pytest
import torch

from kd_ray.batch_plan import check_world_sizes
from kd_ray.checks import validate
from kd_ray.core.errors import UserError
from kd_ray.spec import changed_fields, fingerprint
from kd_ray.train import checkpoint
from kd_ray.train.optim import make_optimizer, make_scheduler


def write_checkpoint(directory: str, step: int) -> str:
    model = torch.nn.Linear(4, 3)
    optimizer = make_optimizer(model.parameters(), {"name": "adamw", "lr": 0.01, "weight_decay": 0.0, "betas": (0.9, 0.999), "momentum": 0.9}, torch.device("cpu"))
    scheduler = make_scheduler(optimizer, {"warmup_steps": 0, "min_lr_ratio": 0.0}, 100)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    assert checkpoint.write(directory, model, optimizer, scheduler, None, {"step": step, "samples": step * 8},
                            {"model": "x"}, {"fingerprint": {"a": 1}, "position": step * 8})
    return directory


@pytest.fixture
def run_dir(tmp_path):
    for i, step in enumerate((10, 20, 30)):
        write_checkpoint(str(tmp_path / f"checkpoint_2026-11-22_10-00-0{i}.000000"), step)
    return tmp_path


def test_newest_whole_checkpoint_is_picked(run_dir):
    chosen, skipped = checkpoint.pick(str(run_dir))
    assert chosen.endswith("0-02.000000") and skipped == []
    state = checkpoint.read_resume(chosen)
    assert state["step"] == 30 and state["position"] == 240 and set(state["sha256"]) == {"student.safetensors", "student.json", "train_state.pt"}


@pytest.mark.parametrize("damage, reason", [
    (lambda d: open(os.path.join(d, "train_state.pt"), "r+b").write(b"junk"), "train_state.pt does not match its checksum"),
    (lambda d: os.remove(os.path.join(d, "student.safetensors")), "student.safetensors is missing"),
    (lambda d: os.remove(os.path.join(d, "resume.json")), "resume.json is missing"),  # half-written: it is written last
])
def test_damaged_newest_is_skipped_for_the_previous(run_dir, damage, reason):
    newest = checkpoint.candidates(str(run_dir))[0]
    damage(newest)
    chosen, skipped = checkpoint.pick(str(run_dir))
    assert checkpoint.read_resume(chosen)["step"] == 20
    assert skipped[0][0] == newest and reason in skipped[0][1]


def test_restore_round_trip(tmp_path):
    path = write_checkpoint(str(tmp_path / "c"), 7)
    model = torch.nn.Linear(4, 3)
    optimizer = make_optimizer(model.parameters(), {"name": "adamw", "lr": 0.01, "weight_decay": 0.0, "betas": (0.9, 0.999), "momentum": 0.9}, torch.device("cpu"))
    scheduler = make_scheduler(optimizer, {"warmup_steps": 0, "min_lr_ratio": 0.0}, 100)
    counters = checkpoint.restore(path, model, optimizer, scheduler, None)
    assert counters == {"step": 7, "samples": 56}
    assert optimizer.state_dict()["state"][0]["step"] == 1


def job(tmp_path, **train):
    return {
        "run": {"name": "r", "storage_path": str(tmp_path)},
        "data": {"source": "builtin:digits", "shape": [64]},
        "student": {"model": "mlp", "kwargs": {"in_features": 64, "num_classes": 10, "hidden": 8, "depth": 1}},
        "train": {"epochs": 1, "global_batch_size": 64, "micro_batch_size": 16, **train},
    }


def test_fingerprint_separates_compatible_from_incompatible_changes(tmp_path):
    base = fingerprint(validate(job(tmp_path)), 1400)
    compatible = fingerprint(validate(job(tmp_path, epochs=5, micro_batch_size=8, num_workers=[1, 2], log_every=3)), 1400)
    assert changed_fields(base, compatible) == []
    changed = fingerprint(validate(job(tmp_path, global_batch_size=32, optimizer={"lr": 0.5})), 1400)
    assert changed_fields(base, changed) == [
        "train.global_batch_size: 64 -> 32",
        "train.optimizer: {'name': 'adamw', 'lr': 0.001, 'weight_decay': 0.01, 'betas': [0.9, 0.999], 'momentum': 0.9} -> "
        "{'name': 'adamw', 'lr': 0.5, 'weight_decay': 0.01, 'betas': [0.9, 0.999], 'momentum': 0.9}",
    ]
    assert changed_fields(base, fingerprint(validate(job(tmp_path)), 1000)) == ["data.train_rows: 1400 -> 1000"]


@pytest.mark.parametrize("low, high, ok", [(1, 3, True), (2, 3, True), (1, 4, False), (2, 4, False), (6, 6, True)])
def test_elastic_ranges_must_split_the_global_batch(low, high, ok):
    if ok:
        check_world_sizes(96, 16, low, high)
        return
    with pytest.raises(UserError) as info:
        check_world_sizes(96, 16, low, high)
    assert info.value.field == "train.num_workers" and "world size(s) 4 in" in info.value.message
    fix = int(info.value.message.rsplit("micro_batch_size: ", 1)[1])
    assert fix == 8
    check_world_sizes(96, fix, low, high)  # the suggested micro batch works for the whole range


def test_a_range_no_micro_batch_can_fit_says_so():
    with pytest.raises(UserError) as info:
        check_world_sizes(64, 16, 1, 4)  # 3 never divides 64
    assert "world size(s) 3 in [1, 4]" in info.value.message and "micro_batch_size:" not in info.value.message


def test_resume_json_is_plain_json(run_dir):
    newest = checkpoint.candidates(str(run_dir))[0]
    with open(os.path.join(newest, checkpoint.RESUME)) as f:
        assert json.load(f)["fingerprint"] == {"a": 1}
