"""Causal-LM distillation without Ray: token rows, the per-token loss, and its normalisation.

- Rows: targets shifted per document before packing (none crosses a document, the last token of
  each has none, prompt tokens carry none), next-fit packing, every loss token kept once.
- A packed row gives each document the same loss as the document run alone.
- The chunked per-token loss equals the dense one at k = V and never holds more than a chunk of
  logits; reverse KL and JSD(beta) on the same buckets behave as divergences.
- Normalisation: one global batch gives the same gradient as 1 micro-batch, as 4 micro-batches
  with uneven token counts, and on 2 gloo workers with uneven tokens per rank (DDP, and FSDP2
  with activation checkpointing per decoder block), as the Trainer computes its denominator.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import spawn_gloo

from kd_ray.core.columns import (
    DOCS,
    TAIL_LSE,
    TARGETS,
    TOKEN_POS,
    TOKENS,
    TOPK_INDICES,
    TOPK_VALUES,
)
from kd_ray.core.errors import UserError
from kd_ray.data.tokens import IGNORE, PAD_DOC, cut, make_rows, pack, shift_targets
from kd_ray.losses import (
    bucket_divergence,
    bucket_log_probs,
    distill_loss,
    token_loss,
    topk_compress,
)
from kd_ray.models.lm import llama
from kd_ray.spec import parse

VOCAB, SEQ = 61, 24
TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64)


# ---------------------------------------------------------------------------------------------- rows


def test_targets_are_shifted_per_document_and_prompts_carry_no_loss():
    tokens = np.array([5, 6, 7, 8, 9])
    mask = np.array([False, False, True, True, True])  # a prompt of 2 tokens, a response of 3
    np.testing.assert_array_equal(shift_targets(tokens, mask), [IGNORE, 7, 8, 9, IGNORE])
    np.testing.assert_array_equal(shift_targets(tokens, np.ones(5, bool)), [6, 7, 8, 9, IGNORE])


def test_cut_and_pack_keep_every_loss_token_once_and_never_cross_a_document():
    rng = np.random.default_rng(0)
    docs = [(rng.integers(0, VOCAB, n), np.ones(n, bool)) for n in (3, 30, 1, 7, 24, 25, 12)]
    rows = make_rows(docs, SEQ, "pack")
    # Every (token, next token) pair of every document is a target exactly once; pieces cut at SEQ
    # lose only the pair that spans the cut (the next piece starts without context).
    expected = sorted((int(a), int(b)) for t, _ in docs for piece in (t[i:i + SEQ] for i in range(0, len(t), SEQ))
                      for a, b in zip(piece[:-1], piece[1:]))
    got = sorted((int(rows.tokens[r, c]), int(rows.targets[r, c])) for r, c in zip(*np.nonzero(rows.targets != IGNORE)))
    assert got == expected
    for r in range(len(rows.tokens)):
        for c in range(SEQ - 1):
            if rows.targets[r, c] != IGNORE:  # a target is the next token of the same document
                assert rows.docs[r, c] == rows.docs[r, c + 1] != PAD_DOC and rows.targets[r, c] == rows.tokens[r, c + 1]
        starts = np.flatnonzero(rows.positions[r] == 0)
        assert all(rows.docs[r, s] != rows.docs[r, s - 1] for s in starts if s > 0 and rows.docs[r, s] != PAD_DOC)
    assert len(cut(np.array([4]), np.ones(1, bool), SEQ)) == 0  # nothing to predict: dropped
    assert len(pack([(np.arange(3, dtype=np.int32), np.array([1, 2, IGNORE], np.int32))] * 9, 8).tokens) == 5  # next-fit: 2 a row


def _tiny_lm(seed: int = 0):
    torch.manual_seed(seed)
    return llama(vocab_size=VOCAB, **TINY)


def test_a_packed_row_gives_each_document_its_own_loss():
    lm = _tiny_lm()
    rng = np.random.default_rng(1)
    docs = [(rng.integers(0, VOCAB, n), np.ones(n, bool)) for n in (9, 6, 7)]
    packed = make_rows(docs, SEQ, "pack")
    assert len(packed.tokens) == 1  # all three share one row

    def per_doc_loss(rows) -> list[float]:
        decoder, head = lm.get_decoder(), lm.get_output_embeddings()
        with torch.no_grad():
            hidden = decoder(input_ids=torch.from_numpy(rows.tokens).long(), position_ids=torch.from_numpy(rows.positions).long(),
                             use_cache=False).last_hidden_state
            ce = torch.nn.functional.cross_entropy(head(hidden).flatten(0, 1), torch.from_numpy(rows.targets).long().flatten(),
                                                   ignore_index=IGNORE, reduction="none").reshape(rows.targets.shape)
        docs_of = rows.docs
        return [float(ce[r][docs_of[r] == d].sum()) for r in range(len(docs_of)) for d in sorted(set(docs_of[r]) - {PAD_DOC})]

    one_by_one = [per_doc_loss(make_rows([d], SEQ, "pad"))[0] for d in docs]
    np.testing.assert_allclose(per_doc_loss(packed), one_by_one, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- loss


def _head(weight):
    return lambda h: h @ weight.T


def test_chunked_token_loss_equals_the_dense_loss_at_k_equals_v():
    torch.manual_seed(0)
    n, d = 50, 16
    h = torch.randn(n, d, requires_grad=True)
    w = torch.randn(VOCAB, d, requires_grad=True)
    y, t = torch.randint(0, VOCAB, (n,)), 2 * torch.randn(n, VOCAB)
    top = topk_compress(t, VOCAB, temperatures=2.0, dtype=torch.float32)
    terms = token_loss(h, _head(w), y, top, temperature=2.0, alpha=0.3, denominator=n, chunk_tokens=7)
    terms.loss.backward()
    got = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    dense = distill_loss(h @ w.T, t, y, temperature=2.0, alpha=0.3, denominator=n)
    dense.loss.backward()
    torch.testing.assert_close(terms.loss, dense.loss)
    torch.testing.assert_close(got[0], h.grad)
    torch.testing.assert_close(got[1], w.grad)
    small = token_loss(h, _head(w), y, topk_compress(t, 5, temperatures=2.0, dtype=torch.float32), temperature=2.0, alpha=1.0,
                       denominator=n, chunk_tokens=7)
    assert small.kd_sum <= dense.kd_sum + 1e-4  # k+1 buckets never exceed the dense KL


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_bucket_divergences_are_zero_only_when_the_student_matches(kind):
    torch.manual_seed(1)
    t = torch.randn(20, VOCAB)
    top = topk_compress(t, 8, temperatures=1.0, dtype=torch.float32)
    same = bucket_divergence(*bucket_log_probs(t, top, 1.0), kind, beta=0.3)
    other = bucket_divergence(*bucket_log_probs(torch.randn(20, VOCAB), top, 1.0), kind, beta=0.3)
    assert same.abs().max() < 1e-5 and (other > 1e-3).all()
    if kind == "jsd":
        assert (other <= np.log(2) + 1e-6).all()  # a JSD is bounded by log 2 for any beta


# ---------------------------------------------------------------------------------------------- normalisation

ROWS = 8


def _spec(strategy: str = "ddp", checkpointing: bool = False):
    return parse({"task": "causal_lm", "run": {"name": "t"}, "data": {"source": "x.jsonl", "tokenizer": "tok.json"},
                  "student": {"model": "llama"}, "distill": {"temperature": 2.0, "alpha": 0.6, "top_k": 6, "chunk_tokens": 16},
                  "train": {"max_steps": 1, "global_batch_size": ROWS, "micro_batch_size": 1, "strategy": strategy,
                            "activation_checkpointing": checkpointing}})


def _batches() -> list[dict]:
    """ROWS rows with very different numbers of loss tokens, and the teacher's top-k for them."""
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)
    targets = torch.roll(tokens, -1, dims=1)
    for r in range(ROWS):
        targets[r, (r + 1) * SEQ // (ROWS + 2):] = IGNORE  # row r carries about r+1 tenths of its tokens
    top = topk_compress(3 * torch.randn(ROWS, SEQ, VOCAB, generator=g), 6, temperatures=2.0, dtype=torch.float32)
    return [{TOKENS: tokens[r:r + 1], TOKEN_POS: torch.arange(SEQ)[None], TARGETS: targets[r:r + 1], DOCS: torch.zeros(1, SEQ, dtype=torch.long),
             TOPK_VALUES: top.values[r:r + 1], TOPK_INDICES: top.indices[r:r + 1], TAIL_LSE: top.tail_lse[r:r + 1]}
            for r in range(ROWS)]


def _joined(rows: list[dict]) -> dict:
    return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}


def _train_step(model, task, micro_batches: list[dict], world: int) -> None:
    """The Trainer's step: the denominator from the step's counts on every rank, then micro-steps."""
    from kd_ray.train.parallel import grad_sync
    from kd_ray.train.step import global_denominator

    denominator = global_denominator([task.count(b) for b in micro_batches], world)
    for i, b in enumerate(micro_batches):
        with grad_sync(model, i == len(micro_batches) - 1):  # as the Trainer runs it
            task.micro_step(model, b, denominator, torch.device("cpu"), None)


def _grads(model) -> dict:
    from kd_ray.models.weights import clean_key
    from kd_ray.train.parallel import unwrap

    out = {}
    for name, p in unwrap(model).named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        out[clean_key(name)] = g.detach().clone()
    return out


def _student(task):
    from kd_ray.tasks.causal_lm import StudentLM

    return StudentLM(_tiny_lm(), VOCAB)


def _lm_cases(rank: int):
    """This rank's rows (uneven tokens per rank) as 2 micro-batches of 1 and 3 rows, under DDP,
    then under FSDP2 with activation checkpointing per decoder block."""
    from kd_ray.tasks.causal_lm import CausalLM
    from kd_ray.train.parallel import wrap

    rows = _batches()
    mine = [rows[i] for i in ((0, 1, 2, 7) if rank == 0 else (3, 4, 5, 6))]

    def run(strategy: str, checkpointing: bool):
        task = CausalLM(_spec(strategy, checkpointing))
        student = _student(task)
        model = wrap(student, strategy, "fp32", torch.device("cpu"), task.fsdp_units(student), checkpointing)
        _train_step(model, task, [_joined(mine[:1]), _joined(mine[1:])], world=2)
        return _grads(model)

    return [("ddp", lambda: run("ddp", False)), ("fsdp", lambda: run("fsdp", True))]


def test_one_global_batch_gives_one_gradient_however_its_tokens_are_split(tmp_path):
    from kd_ray.tasks.causal_lm import CausalLM

    task = CausalLM(_spec())
    rows = _batches()
    counts = [int(task.count(r)) for r in rows]
    assert len(set(counts)) == ROWS  # every row carries a different number of loss tokens

    whole = _student(task)
    _train_step(whole, task, [_joined(rows)], world=1)
    reference = _grads(whole)
    split = _student(task)
    _train_step(split, task, [_joined(rows[:1]), _joined(rows[1:4]), _joined(rows[4:5]), _joined(rows[5:])], world=1)
    for name, g in _grads(split).items():
        torch.testing.assert_close(g, reference[name], atol=1e-6, rtol=1e-5, msg=lambda m: f"4 micro-batches, {name}: {m}")

    for rank, result in enumerate(spawn_gloo(_lm_cases, 2, str(tmp_path), 300)):
        for strategy in ("ddp", "fsdp"):
            got = result[strategy]
            assert isinstance(got, dict), f"rank {rank} {strategy}:\n{got}"
            assert got.keys() == reference.keys()
            for name, g in got.items():
                torch.testing.assert_close(g, reference[name], atol=1e-6, rtol=1e-5,
                                           msg=lambda m: f"2 workers, {strategy}, rank {rank}, {name}: {m}")


def test_a_teacher_on_several_gpus_gets_contiguous_even_runs_of_layers():
    from kd_ray.models.lm import placement_plan

    plan = placement_plan(30, 4)
    layers = [plan[f"model.layers.{i}"] for i in range(30)]
    assert layers == sorted(layers) and sorted(set(layers)) == [0, 1, 2, 3]  # contiguous, every GPU used
    assert max(layers.count(g) for g in range(4)) - min(layers.count(g) for g in range(4)) <= 1  # as even as can be
    assert plan["model.embed_tokens"] == 0 and plan["model.norm"] == plan["lm_head"] == 3
    assert set(placement_plan(2, 1).values()) == {0}
    with pytest.raises(ValueError, match="at least one layer"):
        placement_plan(2, 3)


# ---------------------------------------------------------------------------------------------- mistakes


@pytest.fixture(scope="module")
def lm_files(tmp_path_factory) -> dict:
    """A teacher directory with its own tokenizer, another tokenizer, and JSON-lines data."""
    import json

    from test_jobs import _tiny_hf_dir
    from test_lm_end_to_end import _tokenizer

    root = tmp_path_factory.mktemp("lm_mistakes")
    text = ["In the beginning God created the heaven and the earth.", "And the earth was without form, and void."] * 10
    tokenizer = _tokenizer(text)
    teacher = _tiny_hf_dir(root / "teacher", tokenizer, 1)
    other = _tokenizer([t.upper() for t in text])
    other.save_pretrained(root / "other")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t, "q": t, "a": t}) + "\n" for t in text))
    return {"root": root, "teacher": teacher, "other": str(root / "other" / "tokenizer.json"), "data": str(data)}


def _lm_job(files, **data) -> dict:
    return {"task": "causal_lm", "run": {"name": "m", "storage_path": str(files["root"] / "runs")},
            # token shards beside the root, not in it: tests compare the root's tree before and after
            "data": {"source": files["data"], "text": "text", "tokenizer": "teacher", "max_seq_len": 64,
                     "prepared": f"{files['root']}-prepared", **data},
            "teacher": {"model": files["teacher"]},
            "student": {"model": "llama", "kwargs": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                                                     "num_key_value_heads": 1, "intermediate_size": 32, "max_position_embeddings": 128}},
            "distill": {"top_k": 8}, "train": {"max_steps": 2, "global_batch_size": 4, "micro_batch_size": 2}}


MISTAKES = [
    ("a tokenizer that is not the teacher's", lambda f, j: j["data"].update(tokenizer=f["other"]), "data.tokenizer"),
    ("a vocabulary the student cannot hold", lambda f, j: j["student"]["kwargs"].update(vocab_size=10), "student.kwargs"),
    ("max_seq_len beyond the student's positions", lambda f, j: j["data"].update(max_seq_len=200), "data.max_seq_len"),
    ("a prompt without a response", lambda f, j: j["data"].update(text=None, prompt="q"), "data.response"),
    ("a response column that is not there", lambda f, j: j["data"].update(text=None, prompt="q", response="answer"), "data.response"),
    ("a text column that is not there", lambda f, j: j["data"].update(text="body"), "data.text"),
    ("k larger than the vocabulary", lambda f, j: j["distill"].update(top_k=100_000), "distill.top_k"),
    ("no tokenizer and no teacher", lambda f, j: (j.pop("teacher"), j["data"].update(tokenizer=None)), "data.tokenizer"),
    ("an LM cache of full logits", lambda f, j: j["teacher"].update(mode="cached", cache={"path": "c", "format": "full"}), "teacher.cache.format"),
    ("a model that is not a language model", lambda f, j: j["student"].update(model="resnet18"), "student.model"),
    ("an unknown built-in text", lambda f, j: j["data"].update(source="builtin:bible"), "data.source"),
    ("a chat template without prompt and response", lambda f, j: j["data"].update(chat_template=True), "data.chat_template"),
    ("a chat template the tokenizer lacks", lambda f, j: j["data"].update(text=None, prompt="q", response="a", chat_template=True),
     "data.chat_template"),
    ("a list mixing files and a built-in text", lambda f, j: j["data"].update(source=[f["data"], "builtin:kjv"]), "data.source"),
    ("conversations and text at once", lambda f, j: j["data"].update(messages="text"), "data.messages"),
    ("conversations that are text", lambda f, j: j["data"].update(text=None, messages="text"), "data.messages"),
]


@pytest.mark.parametrize("what,mistake,field", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_each_lm_mistake_is_one_line_naming_the_field(lm_files, tmp_path, capsys, what, mistake, field):
    import copy

    from conftest import write_job

    from kd_ray.cli import main

    assert main(["validate", write_job(tmp_path / "ok.yaml", _lm_job(lm_files))]) == 0, capsys.readouterr().err
    capsys.readouterr()
    job = copy.deepcopy(_lm_job(lm_files))
    mistake(lm_files, job)
    code = main(["validate", write_job(tmp_path / "job.yaml", job)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"kd-ray: error: {field}: "), (code, err)
    assert "Traceback" not in err


def test_a_classifier_refuses_lm_only_settings(tmp_path, capsys):
    from conftest import digits_job, write_job

    from kd_ray.cli import main

    for section, key, value, field in (("distill", "loss", "jsd", "distill.loss"), ("data", "text", "text", "data.text"),
                                       ("data", "chat_template", True, "data.chat_template"),
                                       ("data", "prepared", "p", "data.prepared"),
                                       ("data", "source", ["builtin:digits"], "data.source")):
        job = digits_job(tmp_path, "c")
        job.setdefault(section, {})[key] = value
        assert main(["validate", write_job(tmp_path / "c.yaml", job)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"kd-ray: error: {field}: ") and "\n" not in err, err


def test_padded_rows_are_trimmed_per_micro_batch_to_a_multiple_of_64():
    from kd_ray.tasks.causal_lm import trim

    docs = [(np.arange(n) % VOCAB, np.ones(n, bool)) for n in (70, 5)]
    rows = make_rows(docs, 256, "pad")
    batch = {TOKENS: torch.from_numpy(rows.tokens), DOCS: torch.from_numpy(rows.docs), TARGETS: torch.from_numpy(rows.targets),
             TOKEN_POS: torch.from_numpy(rows.positions), "id": torch.arange(2)}
    out = trim(batch)
    assert out[TOKENS].shape == (2, 128) and out["id"].shape == (2,)  # 70 tokens -> 128; per-row columns untouched
    assert (out[TARGETS] != IGNORE).sum() == (batch[TARGETS] != IGNORE).sum()  # no loss token lost
    short = trim({k: v[1:] for k, v in batch.items()})
    assert short[TOKENS].shape == (1, 64)


@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_the_students_decoder_runs_in_the_jobs_precision_and_its_loss_sums_in_fp32(precision, dtype):
    """train.precision bf16 must reach the decoder's matmuls (on an H200 the LM step ran at its
    fp32 speed and memory while only the head was under autocast), and the loss stays fp32."""
    from kd_ray.tasks.causal_lm import CausalLM

    spec = _spec()
    spec.train.precision = precision
    task, model = CausalLM(spec), _student(None)
    seen = []
    model.lm.model.layers[0].mlp.up_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    batch = _joined(_batches()[:2])
    terms = task.micro_step(model, batch, task.count(batch), torch.device("cpu"), None)
    assert seen == [dtype] and terms.kd_sum.dtype == torch.float32 and torch.isfinite(terms.loss)


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who made the heaven?"},
                {"role": "assistant", "content": "God."}, {"role": "user", "content": "When?"},
                {"role": "assistant", "content": "In the beginning."}]


def test_conversations_carry_loss_on_the_assistants_turns_only():
    """Rendered with the chat template of SmolLM2-Instruct's tokenizer (the LM quickstart's
    teacher's): the loss mask covers each assistant turn and its end-of-turn tokens, nothing of
    the system's or the user's; prompt + response with data.chat_template are the conversation of
    a user turn and an assistant turn."""
    from kd_ray.data.text import Encoder, chat_tokens, tokenized
    from kd_ray.models import lm as lms
    from kd_ray.spec import DataSpec

    tok = lms.load_tokenizer("smollm2-135m-instruct", None)
    ids, mask = chat_tokens(tok, CONVERSATION, "document 0")
    assert tok.decode(ids) == tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert tok.decode(ids[mask]) == "God.<|im_end|>\nIn the beginning.<|im_end|>\n"
    assert "Who made" in tok.decode(ids[~mask]) and "Be brief." in tok.decode(ids[~mask])

    data = DataSpec(source="x.jsonl", prompt="q", response="a", chat_template=True)
    [(_, ids, mask)] = tokenized([{"id": 0, "q": "Who made the heaven?", "a": "God."}], data, Encoder.of(tok, data))
    want = chat_tokens(tok, CONVERSATION[1:3], "document 0")
    assert np.array_equal(ids, want[0]) and np.array_equal(mask, want[1])
    assert tok.decode(ids[mask]) == "God.<|im_end|>\n"


def test_conversations_are_checked_as_they_are_read(tmp_path):
    import json

    from kd_ray.data.text import first_documents
    from kd_ray.spec import DataSpec

    for bad, needle in (([{"role": "user", "content": "Hi"}], "at least one with role assistant"),
                        ([{"role": "assistant", "content": 3}], "must be a list of {role, content}"), ("Hi", "holds 'Hi'")):
        (tmp_path / "c.jsonl").write_text(json.dumps({"m": CONVERSATION}) + "\n" + json.dumps({"m": bad}) + "\n")
        with pytest.raises(UserError) as e:
            first_documents(str(tmp_path / "c.jsonl"), DataSpec(source="c.jsonl", messages="m"), "data.source")
        assert e.value.field == "data.messages" and "row 1 of c.jsonl" in e.value.message and needle in e.value.message, e.value
