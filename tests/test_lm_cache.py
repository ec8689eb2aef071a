"""A language model's teacher-output cache (kd_ray.cache.tokens): the per-token format without
Ray, a real teacher's bytes per token, and how a cache is compared with a job. Capture, resume
and training from a cache run end to end in tests/test_lm_end_to_end.py."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from kd_ray.cache import files as shards
from kd_ray.cache import manifest as cache
from kd_ray.cache.tokens import (
    TokenCodec,
    delta_code,
    delta_decode,
    id_dtype,
    token_table,
)
from kd_ray.core.columns import (
    DOCS,
    ID,
    INPUT,
    TAIL_LSE,
    TARGET_LOGPROB,
    TARGETS,
    TOKEN_POS,
    TOKENS,
    TOPK_INDICES,
    TOPK_VALUES,
)
from kd_ray.data.tokens import make_rows
from kd_ray.losses import topk_parts
from kd_ray.teacher_signal import values_from_column

OUTPUTS = dict(format="topk", k=8, dtype="float16", temperatures=[1.0, 2.0], vocab=300, ids="uint16")


def _rows(seed: int, seq: int = 32, packing: str = "pack"):
    """Token rows of random documents, some with prompt tokens (no loss)."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(12):
        n = int(rng.integers(3, 40))
        mask = np.ones(n, bool)
        mask[: int(rng.integers(0, n // 2 + 1))] = False
        docs.append((rng.integers(0, OUTPUTS["vocab"], n), mask))
    r = make_rows(iter(docs), seq, packing)
    return {ID: np.arange(len(r.tokens), dtype=np.int64) + 1000, TOKENS: r.tokens, TARGETS: r.targets, DOCS: r.docs, TOKEN_POS: r.positions}


def _signal(raw: dict, outputs: dict, seed: int) -> tuple[dict, torch.Tensor]:
    """What the teacher pool computes at the loss positions of `raw`, from random logits; and
    the dense (rows, seq, vocab) logits it came from."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn((*raw[TOKENS].shape, outputs["vocab"]), generator=g) * 4
    keep = torch.from_numpy(raw[TARGETS] >= 0)
    z = logits[keep]
    values, indices, tails, lse = topk_parts(z, outputs["k"], tuple(outputs["temperatures"]))
    target = z.gather(-1, torch.from_numpy(raw[TARGETS])[keep].long()[:, None])[:, 0] - lse
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[outputs["dtype"]]
    return {TOPK_VALUES: values.to(dtype), TOPK_INDICES: indices.int(), TAIL_LSE: tails, TARGET_LOGPROB: target}, keep


def test_delta_code_is_lossless_and_makes_descending_log_probs_small():
    rng = np.random.default_rng(0)
    any_bits = rng.integers(0, 1 << 16, (50, 64)).astype(np.uint16)  # wrapping differences too
    np.testing.assert_array_equal(delta_decode(delta_code(any_bits)), any_bits)
    wide = rng.integers(0, 1 << 32, (5, 9), dtype=np.uint64).astype(np.uint32)
    np.testing.assert_array_equal(delta_decode(delta_code(wide)), wide)
    log_probs = -np.sort(rng.exponential(3, (100, 64)), axis=1).astype(np.float16)  # <= 0, descending
    codes = delta_code(log_probs.view(np.uint16))
    assert (codes[:, 1:] < 1024).mean() > 0.95  # small steps: high bytes zero


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("packing", ["pack", "pad"])
def test_shard_round_trip_gives_what_the_pool_sends(dtype, packing):
    """token_table -> parquet bytes -> decode -> rows picked in any order: at each loss position
    the values, ids, tail (the job's temperature's column) and target log-prob the pool sends,
    bit for bit; zeros elsewhere, as the pool's dense columns. The same input gives the same bytes."""
    outputs = {**OUTPUTS, "dtype": dtype}
    raw = _rows(1, packing=packing)
    signal, keep = _signal(raw, outputs, seed=2)
    data = shards.to_parquet(token_table(raw, signal, outputs["vocab"]))
    assert data == shards.to_parquet(token_table({k: v.copy() for k, v in raw.items()}, signal, outputs["vocab"]))
    codec = TokenCodec(outputs, temperature=2.0)
    unit = codec.decode(data)
    rows = np.array([3, 0, len(raw[ID]) - 1, 3])
    got = codec.rows(unit, rows)
    np.testing.assert_array_equal(got[ID], raw[ID][rows])
    np.testing.assert_array_equal(got[INPUT], codec.digests({k: v[rows] for k, v in raw.items()}))
    for name, column in ((TOPK_VALUES, None), (TOPK_INDICES, None), (TAIL_LSE, 1), (TARGET_LOGPROB, None)):
        full = torch.zeros((*keep.shape, *signal[name].shape[1:]), dtype=signal[name].dtype)
        full[keep] = signal[name]
        want = full[torch.from_numpy(rows)]
        if column is not None:
            want = want[..., column:column + 1]
        have = values_from_column(torch.from_numpy(got[name]))  # bfloat16 travels as its bits
        assert have.shape == want.shape, name
        torch.testing.assert_close(have.to(want.dtype), want, rtol=0, atol=0)
    assert got[TOPK_INDICES].dtype == np.int32 and got[TAIL_LSE].dtype == np.float32


def test_ids_are_uint16_only_when_the_vocabulary_fits():
    assert id_dtype(49_152) == np.uint16 and id_dtype(65_536) == np.uint16
    assert id_dtype(65_537) == np.int32 and id_dtype(151_936) == np.int32
    outputs = {**OUTPUTS, "vocab": 151_936, "ids": "int32", "k": 4}
    raw = _rows(3)
    raw[TOKENS] = raw[TOKENS] + 150_000
    signal, _ = _signal(raw, {**outputs, "vocab": 300}, seed=4)
    signal[TOPK_INDICES] = signal[TOPK_INDICES] + 151_000
    table = token_table(raw, signal, outputs["vocab"])
    assert str(table.schema.field(TOKENS).type.value_type) == "int32"
    unit = TokenCodec(outputs, 1.0).decode(shards.to_parquet(table))
    np.testing.assert_array_equal(unit.indices, signal[TOPK_INDICES].numpy())


def test_schema_names_each_column():
    schema = TokenCodec(OUTPUTS).schema()
    assert schema == {"id": "int64", "row": "int32", "input_digest": "uint64", "tokens": "fixed_size_list<item: uint16>[1]",
                      "loss_mask": "fixed_size_list<item: bool>[1]", "topk_logprobs": "list<item: uint16>",
                      "topk_ids": "list<item: uint16>", "tail_lse": "list<item: float>", "target_logprob": "list<item: float>"}
    # What the names stand for: the schema is that of a real shard's table, and the column types
    # follow the vocabulary (ids past 65,535 take int32) and the value dtype (bits of float16 or
    # bfloat16 in 16, of float32 in 32).
    raw = _rows(3)
    signal, _ = _signal(raw, OUTPUTS, 3)
    table = token_table(raw, signal, OUTPUTS["vocab"])
    def typed(types: dict) -> dict:  # a row's length is the job's max_seq_len, not the schema's
        return {name: re.sub(r"\[\d+\]$", "[N]", t) for name, t in types.items()}

    assert typed({f.name: str(f.type) for f in table.schema}) == typed(schema)
    wide = TokenCodec({**OUTPUTS, "vocab": 128_256, "dtype": "float32"}).schema()
    assert wide["topk_ids"] == "list<item: int32>" and wide["topk_logprobs"] == "list<item: uint32>"
    assert wide["tokens"] == "fixed_size_list<item: int32>[1]"


def test_a_changed_row_is_caught_by_its_digest():
    raw = _rows(5)
    codec = TokenCodec(OUTPUTS)
    d = codec.digests(raw)
    changed = {k: v.copy() for k, v in raw.items()}
    changed[TARGETS][2, 5] = -100 if changed[TARGETS][2, 5] >= 0 else 7  # the mask moved, tokens the same
    assert (codec.digests(changed) != d).tolist() == [i == 2 for i in range(len(d))]


def _tokenizer_file(path, texts: list[str], vocab: int = 400) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))
    return str(path)


def test_a_cache_from_another_tokenizer_of_the_same_size_is_refused(tmp_path):
    """Two BPE tokenizers of the same vocabulary size, trained on different text: the cache's
    manifest tells them apart (kd_ray.models.lm.tokenizer_digest) and names data.tokenizer."""
    from kd_ray.checks import validate
    from kd_ray.data.text import kjv_chapters
    from kd_ray.models.lm import llama
    from kd_ray.models.weights import save
    from kd_ray.tasks.build import task_for

    chapters = [c["text"] for c in kjv_chapters()]
    a = _tokenizer_file(tmp_path / "a.json", chapters[:40])
    b = _tokenizer_file(tmp_path / "b.json", chapters[900:940])
    teacher = llama(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    save(teacher.state_dict(), str(tmp_path / "teacher.safetensors"))
    kwargs = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)

    def job(tokenizer: str, **cache_block) -> dict:
        return {"task": "causal_lm", "run": {"name": "t", "storage_path": str(tmp_path / "runs")},
                "data": {"source": "builtin:kjv", "tokenizer": tokenizer, "max_seq_len": 64},
                "teacher": {"model": "llama", "kwargs": kwargs, "weights": str(tmp_path / "teacher.safetensors"), "mode": "cached",
                            "cache": {"path": str(tmp_path / "cache"), **cache_block}},
                "student": {"model": "llama", "kwargs": kwargs}, "distill": {"top_k": 16, "temperature": 2.0},
                "train": {"max_steps": 1, "global_batch_size": 2, "micro_batch_size": 2}}

    spec_a, spec_b = (validate(job(t), job_dir=str(tmp_path)) for t in (a, b))
    assert spec_a.teacher.cache.format == "topk"  # a language model's cache is a top-k per token
    have, want = (TokenCodec.describe(s, None, task_for(s)) for s in (spec_a, spec_b))
    assert have["inputs"]["vocab"] == want["inputs"]["vocab"] == 400
    have["data"] = want["data"] = {"source": None, "eval_source": None}
    assert cache.mismatch(have, have, 2.0, TokenCodec.CHECKED) is None
    field, detail = cache.mismatch(have, want, 2.0, TokenCodec.CHECKED)
    assert field == "data.tokenizer" and "sha256" in detail, detail
    assert have["outputs"] == {"format": "topk", "k": 16, "dtype": "float16", "temperatures": [2.0], "vocab": 400, "ids": "uint16"}
    assert have["teacher"]["files_sha256"] is None and len(have["teacher"]["weights_sha256"]) == 64
    assert cache.mismatch(have, have, 4.0, TokenCodec.CHECKED)[0] == "distill.temperature"
    for other, field in (({"max_seq_len": 128}, "data.max_seq_len"), ({"packing": "pad"}, "data.packing"),
                         ({"max_documents": 9}, "data.max_documents"), ({"eval_split": 0.5}, "data.eval_split")):
        changed = job(a)
        changed["data"].update(other)
        changed_spec = validate(changed, job_dir=str(tmp_path))
        described = TokenCodec.describe(changed_spec, None, task_for(changed_spec))
        assert cache.mismatch(have, {**described, "data": have["data"]}, 2.0, TokenCodec.CHECKED)[0] == field


@pytest.mark.parametrize("block, field", [({"format": "full"}, "teacher.cache.format"), ({"k": 8}, "teacher.cache.k"),
                                          ({"temperatures": [1.0]}, "distill.temperature")])
def test_cache_settings_that_cannot_serve_a_language_model_are_one_line(block, field, tmp_path, capsys):
    import yaml

    from kd_ray.cli import main

    job = {"task": "causal_lm", "run": {"name": "t"}, "data": {"source": "builtin:kjv", "tokenizer": "smollm2-135m-instruct"},
           "teacher": {"model": "smollm2-135m-instruct", "mode": "cached", "cache": {"path": "cache", **block}},
           "student": {"model": "llama"}, "distill": {"top_k": 16, "temperature": 2.0},
           "train": {"max_steps": 1, "global_batch_size": 2, "micro_batch_size": 2}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert main(["validate", str(tmp_path / "job.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"kd-ray: error: {field}: "), err


@pytest.mark.slow
def test_bytes_per_token_of_a_real_teacher():
    """SmolLM2-135M-Instruct (the LM quickstart's teacher, 49,152 tokens) over 1,024 tokens of
    the King James Bible, at bf16 as the quickstart runs it: what a loss token costs on disk
    (ids, tail, target log-prob, the row's tokens and mask included) for k = 16, 64, 128,
    against what the pool sends per token (float16 values, int32 ids, tail, target)."""
    from conftest import ROOT, docs_table, stated

    from kd_ray.checks import load_job
    from kd_ray.data.text import kjv_chapters
    from kd_ray.tasks.build import task_for
    from kd_ray.teacher import placed_teacher

    spec = load_job(f"{ROOT}/jobs/lm_quickstart.yaml", [])
    task = task_for(spec)
    text = " ".join(c["text"] for c in kjv_chapters()[:4])
    ids = np.asarray(task.tokenizer(text)["input_ids"][:1024 + 1])
    r = make_rows(iter([(ids, np.ones(len(ids), bool))]), 256, "pack")
    raw = {ID: np.arange(len(r.tokens)), TOKENS: r.tokens, TARGETS: r.targets, DOCS: r.docs, TOKEN_POS: r.positions}
    _, model, _ = placed_teacher(spec, task)
    tokens = int((r.targets >= 0).sum())
    sizes = {}
    for k in (16, 64, 128):
        task.spec = spec.model_copy(update={"distill": spec.distill.model_copy(update={"top_k": k})})
        _, signal = task.teacher_signal(model, raw, torch.device("cpu"), "bf16", (1.0,))
        codec = TokenCodec({**OUTPUTS, "k": k, "temperatures": [1.0], "vocab": task.vocab})
        sizes[k] = (len(shards.to_parquet(token_table(raw, signal, task.vocab))) / tokens, codec.payload())
    print("\nSmolLM2-135M bytes per loss token on disk (sent by the pool): "
          + ", ".join(f"k={k} {d:.1f} ({p})" for k, (d, p) in sizes.items()))
    # The figures docs/cache.md states, as measured here: the payload exactly (the formula,
    # kd_ray.losses.bytes_per_token), the bytes on disk within 3% (bf16 matmuls differ by CPU)
    table = docs_table("cache.md", "Bytes per loss token on disk")
    for k, (on_disk, sent) in sizes.items():
        row = table[str(k)]
        assert sent == stated(row[1]), (k, sent, row)
        assert abs(on_disk - stated(row[0])) <= 0.03 * stated(row[0]), (k, on_disk, row)
    assert sizes[16][0] < sizes[64][0] < sizes[128][0] < sizes[128][1]
