"""cluster.yaml is a valid Ray autoscaler config, checked offline with Ray's own schema and
validation, and it offers the custom resources the GPU job files pin to."""

from __future__ import annotations

import copy
import json
import os

import jsonschema
import ray.autoscaler
import yaml
from conftest import ROOT
from ray.autoscaler._private.util import prepare_config, validate_config

from kd_ray.spec import JobSpec

CLUSTER = os.path.join(ROOT, "cluster.yaml")


def load() -> dict:
    with open(CLUSTER) as f:
        return yaml.safe_load(f)


def test_valid_against_rays_schema_and_validation():
    raw = load()
    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        jsonschema.validate(raw, json.load(f))
    validate_config(prepare_config(copy.deepcopy(raw)))


def test_head_runs_no_work_and_workers_are_spot():
    raw = load()
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"] == {"CPU": 0} and "InstanceMarketOptions" not in head["node_config"]
    for name in ("teacher_gpu", "student_gpu"):
        assert types[name]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
        assert types[name]["min_workers"] <= types[name]["max_workers"]
    assert any("pip install -e /home/ubuntu/kd_ray" in c for c in raw["setup_commands"])
    for node in types.values():  # the runs' bucket through an instance profile, no keys in files
        assert "IamInstanceProfile" in node["node_config"]


def test_nobody_else_can_submit():
    """Ray's dashboard and job API (8265), GCS (6379) and client server (10001) have no
    authentication: the dashboard stays on the head's loopback and no security-group rule opens
    those ports to the world (reach them through `ray dashboard cluster.yaml`, an SSH tunnel)."""
    raw = load()
    starts = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host" in starts and "--dashboard-host=0.0.0.0" not in starts and "--dashboard-host 0.0.0.0" not in starts
    assert "--dashboard-host=127.0.0.1" in starts  # Ray's default would be loopback too; say it where it is read
    rules = raw["provider"].get("security_group", {}).get("IpPermissions", [])
    for node in raw["available_node_types"].values():
        assert not node["node_config"].get("SecurityGroupIds"), "a group of its own may open anything: keep the one above"
    for rule in rules:
        low, high = rule.get("FromPort", 0), rule.get("ToPort", 65535)
        world = [r for r in rule.get("IpRanges", []) if r.get("CidrIp") == "0.0.0.0/0"] + \
                [r for r in rule.get("Ipv6Ranges", []) if r.get("CidrIpv6") == "::/0"]
        opened = [p for p in (8265, 6379, 10001) if low <= p <= high or rule.get("IpProtocol") == "-1"]
        assert not (world and opened), f"{rule} opens {opened} to the world"


def test_gpu_job_resources_exist_on_the_node_types():
    with open(os.path.join(ROOT, "jobs", "resnet50_to_resnet18.yaml")) as f:
        job = yaml.safe_load(f)
    spec = JobSpec.model_validate(job)  # schema only: the job's data lives on the cluster
    types = load()["available_node_types"]
    teacher_node = next(t for t in types.values() if set(spec.teacher.pool.resources) <= set(t.get("resources", {})))
    student_node = next(t for t in types.values() if set(spec.train.resources_per_worker) <= set(t.get("resources", {})))
    assert teacher_node is not student_node
    # the whole student group fits on the student nodes at their maximum count
    per_node = next(iter(spec.train.resources_per_worker.values()))
    capacity = student_node["max_workers"] * student_node["resources"]["student_node"] // per_node
    assert capacity >= spec.train.max_workers
    assert spec.run.storage_path.startswith("s3://")


def test_missing_resources_name_the_fields_for_run_and_for_cache():
    from kd_ray.cluster import missing_resources

    with open(os.path.join(ROOT, "jobs", "resnet50_to_resnet18.yaml")) as f:
        spec = JobSpec.model_validate(yaml.safe_load(f))
    laptop = {"CPU": 6.0, "memory": 1e10}
    run = {field for field, _, _ in missing_resources(spec, laptop)}
    assert run == {"train.use_gpu", "train.resources_per_worker", "teacher.pool.gpus_per_actor", "teacher.pool.resources"}
    # `kd-ray cache` starts only the teacher's pool, even for a job whose mode is cached
    cached = spec.model_copy(update={"teacher": spec.teacher.model_copy(update={"mode": "cached"})})
    capture = {field for field, _, _ in missing_resources(cached, laptop, train=False, teacher_pool=True)}
    assert capture == {"teacher.pool.gpus_per_actor", "teacher.pool.resources"}
    assert {f for f, _, _ in missing_resources(cached, laptop)} == {"train.use_gpu", "train.resources_per_worker"}
    # the cluster of cluster.yaml at its full size has all of it
    full = {"CPU": 64.0, "GPU": 8.0, **{k: 8.0 for t in load()["available_node_types"].values() for k in t.get("resources", {})}}
    assert missing_resources(spec, full) == []
