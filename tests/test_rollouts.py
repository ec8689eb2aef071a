"""On-policy distillation's pure parts, without Ray: the weights schedule, which rows are
generated, prompts, rollouts (a pure function of prompt, weights and seed, whatever else is in
the batch), the rows they become, the sampled-token loss against a dense reference, and the job
file's on-policy checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kd_ray.core.columns import (
    DOCS,
    ROLLOUT,
    SAMPLE_LOGPROB,
    TAIL_LSE,
    TARGET_LOGPROB,
    TARGETS,
    TOKEN_POS,
    TOKENS,
    TOPK_INDICES,
    TOPK_VALUES,
)
from kd_ray.core.errors import UserError
from kd_ray.data.tokens import IGNORE
from kd_ray.losses import Sampled, TopK, sampled_token_kd, token_loss, topk_parts
from kd_ray.rollouts.actor import eval_prompts, on_policy_rows
from kd_ray.rollouts.sampling import (
    Rollout,
    generate,
    hf_decoder,
    prompt_length,
    rollout_row,
)
from kd_ray.rollouts.versions import oldest_needed, version_for


@pytest.mark.parametrize("sync_every,staleness", [(1, 0), (1, 1), (1, 3), (2, 1), (3, 2), (4, 5)])
def test_each_step_generates_from_the_oldest_version_within_its_staleness(sync_every, staleness):
    for step in range(60):
        v = version_for(step, sync_every, staleness)
        assert v % sync_every == 0 and 0 <= v <= step
        assert step - v <= staleness  # never older than max_staleness
        # the oldest such version: the one before it is too old (or there is none)
        assert v == 0 or step - (v - sync_every) > staleness
    assert [version_for(s, 1, 0) for s in range(4)] == [0, 1, 2, 3]  # strictly on-policy: alternate
    assert [version_for(s, 1, 1) for s in range(4)] == [0, 0, 1, 2]  # one step ahead


@pytest.mark.parametrize("sync_every,staleness", [(1, 0), (1, 1), (2, 1), (2, 3), (4, 3)])
def test_the_versions_kept_are_those_a_resume_or_the_next_steps_generate_from(sync_every, staleness):
    """Every version a kept checkpoint's resume or this attempt's next steps generate from is at
    least oldest_needed; without a checkpoint only the newest few are kept (a 120-step run kept
    all 121 versions of its student, 6 GB, when its start from step 0 counted as a checkpoint)."""
    for done in range(40):
        for checkpoints in ([], [done], [done // 2, done], [3, done] if done >= 3 else []):
            oldest = oldest_needed(checkpoints, done, sync_every, staleness)
            for start in [*checkpoints, done]:
                assert all(version_for(s, sync_every, staleness) >= oldest for s in range(start, start + 50))
        kept_without_checkpoints = done + 1 - oldest_needed([], done, sync_every, staleness)
        assert kept_without_checkpoints <= staleness + sync_every


def test_a_fixed_share_of_every_micro_batch_is_generated():
    positions = np.arange(40, 72)
    picked = on_policy_rows(positions, 8, 0.5)
    assert picked.reshape(-1, 8).sum(axis=1).tolist() == [4] * 4
    assert not on_policy_rows(positions, 8, 0.0).any() and on_policy_rows(positions, 8, 1.0).all()
    ids = np.arange(10_000)
    share = eval_prompts(ids, 0, 0.1).mean()
    assert 0.08 < share < 0.12 and np.array_equal(eval_prompts(ids, 0, 0.1), eval_prompts(ids, 0, 0.1))


def test_a_prompt_is_the_part_before_the_response_or_the_first_n_tokens():
    docs = np.array([0] * 6 + [-1] * 2)
    targets = np.array([IGNORE, IGNORE, 5, 6, 7, IGNORE, IGNORE, IGNORE])  # tokens 3.. are the response
    assert prompt_length(np.arange(8), targets, docs, None) == 3
    assert prompt_length(np.arange(8), np.full(8, IGNORE), docs, None) == 6  # no response: the whole document
    assert prompt_length(np.arange(8), targets, docs, 4) == 4
    assert prompt_length(np.arange(8), targets, docs, 50) == 6


def test_a_rollout_row_trains_on_the_generated_tokens_only():
    row = {TOKENS: np.arange(10, 20, dtype=np.int32), TARGETS: np.full(10, IGNORE, np.int32), DOCS: np.zeros(10, np.int32),
           TOKEN_POS: np.arange(10, dtype=np.int32)}
    out = rollout_row(row, 3, Rollout(np.array([7, 8]), np.array([-0.5, -1.5], np.float32)), version=4)
    assert out[TOKENS].tolist() == [10, 11, 12, 7, 8, 0, 0, 0, 0, 0]
    assert out[TARGETS].tolist() == [IGNORE, IGNORE, 7, 8] + [IGNORE] * 6
    assert out[SAMPLE_LOGPROB].tolist() == [0, 0, -0.5, -1.5] + [0] * 6
    assert out[DOCS].tolist() == [0] * 5 + [-1] * 5 and out[TOKEN_POS].tolist()[:5] == [0, 1, 2, 3, 4]
    assert int(out[ROLLOUT]) == 4


def _tiny_lm(vocab=300):
    from kd_ray.models.decoder import decoder_and_head, sliced_head
    from kd_ray.models.lm import llama

    torch.manual_seed(0)
    lm = llama(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128).eval()
    decoder, head = decoder_and_head(lm)
    return lm, hf_decoder(decoder), sliced_head(head, vocab, "fp32", torch.device("cpu"))


def test_a_rollout_depends_on_its_prompt_weights_and_seed_only():
    lm, decoder, head = _tiny_lm()
    prompts = [np.arange(1, 1 + n) for n in (3, 7, 5, 2, 9)]
    seeds = [11, 12, 13, 14, 15]
    kw = dict(width=16, batch=4, temperature=1.0, top_p=0.9, eos=None, device=torch.device("cpu"))
    together = generate(decoder, head, prompts, seeds, [20] * 5, **kw)
    reversed_ = generate(decoder, head, prompts[::-1], seeds[::-1], [20] * 5, **kw)[::-1]
    alone = generate(decoder, head, prompts[1:2], seeds[1:2], [20], **kw)
    for a, b in zip(together, reversed_):  # other company, other batches: bit for bit the same
        assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.logprobs, b.logprobs)
    assert np.array_equal(together[1].tokens, alone[0].tokens) and np.array_equal(together[1].logprobs, alone[0].logprobs)
    other_seed = generate(decoder, head, prompts[1:2], [99], [20], **kw)
    assert not np.array_equal(other_seed[0].tokens, alone[0].tokens)
    # each token's log-probability is the model's (T = 1) given everything before it, as a full forward computes it
    full = np.concatenate([prompts[0], together[0].tokens])
    with torch.no_grad():
        log_p = torch.log_softmax(lm(input_ids=torch.tensor(full)[None]).logits[0, :, :300].float(), -1)
    ref = log_p[len(prompts[0]) - 1:-1].gather(-1, torch.tensor(together[0].tokens)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(together[0].logprobs), ref, atol=1e-5, rtol=0)


def test_rollouts_stop_at_the_end_token_and_at_their_limit():
    _, decoder, head = _tiny_lm()
    kw = dict(width=8, batch=2, temperature=1.0, top_p=1.0, device=torch.device("cpu"))
    free = generate(decoder, head, [np.array([1, 2])] * 3, [1, 2, 3], [30, 5, 30], eos=None, **kw)
    assert [len(r.tokens) for r in free] == [30, 5, 30]
    eos = int(free[0].tokens[3])  # a token the first rollout samples at its 4th step
    stopped = generate(decoder, head, [np.array([1, 2])], [1], [30], eos=eos, **kw)[0]
    assert stopped.tokens.tolist() == free[0].tokens[:list(free[0].tokens).index(eos) + 1].tolist()
    nucleus = generate(decoder, head, [np.array([1, 2])] * 4, [5, 6, 7, 8], [30] * 4, eos=None, **{**kw, "top_p": 1e-6})
    assert len({tuple(r.tokens) for r in nucleus}) == 1  # a nucleus of one token: greedy, whatever the seed


def test_sampled_token_loss_is_the_reverse_kl_estimator_with_its_score_function_gradient():
    """On the student's own fresh samples: value log q - log p_teacher per token, and gradient
    (log q - log p_teacher) d log q, whose expectation is that of KL(q || p_teacher), computed densely."""
    torch.manual_seed(0)
    n, vocab = 4000, 7
    teacher_logits = torch.randn(vocab)
    z = torch.randn(vocab, requires_grad=True)
    log_q = torch.log_softmax(z, -1)
    x = torch.multinomial(log_q.exp().detach(), n, replacement=True)
    log_p_t = torch.log_softmax(teacher_logits, -1)
    signal = Sampled(log_p_t[x], log_q.detach()[x])
    loss = sampled_token_kd(log_q[x], signal)
    torch.testing.assert_close(loss.detach(), (log_q.detach() - log_p_t)[x])  # ratio 1: fresh samples
    loss.mean().backward()
    dense = torch.randn(vocab, requires_grad=True)
    with torch.no_grad():
        dense.copy_(z)
    q = torch.log_softmax(dense, -1)
    (q.exp() * (q - log_p_t)).sum().backward()
    torch.testing.assert_close(z.grad, dense.grad, atol=0.05, rtol=0)  # Monte Carlo, 4,000 samples
    # a stale sample is weighted by its importance ratio p_student / q
    stale = sampled_token_kd(torch.tensor([-1.0]), Sampled(torch.tensor([-2.0]), torch.tensor([-1.5])))
    torch.testing.assert_close(stale, -torch.tensor(0.5).exp() * torch.tensor([-0.5]))


def test_own_tokens_train_on_the_divergence_alone():
    """A generated token's loss is its divergence (no cross-entropy on the student's own sample);
    a data token's is alpha x KD + (1 - alpha) x CE, as off-policy."""
    torch.manual_seed(0)
    vocab, d = 50, 16
    head_w = torch.randn(vocab, d)
    hidden = torch.randn(6, d)
    targets = torch.randint(0, vocab, (6,))
    values, indices, tails, _ = topk_parts(torch.randn(6, vocab), 8, (1.0,))
    teacher = TopK(values, indices.int(), tails, (1.0,))
    kw = dict(temperature=1.0, alpha=0.3, denominator=1.0, divergence="reverse")
    own = torch.tensor([True, True, True, False, False, False])

    def head(h):
        return h @ head_w.T

    mixed = token_loss(hidden, head, targets, teacher, own=own, **kw)
    first = token_loss(hidden[:3], head, targets[:3], TopK(*(v[:3] for v in teacher[:3]), (1.0,)), **{**kw, "alpha": 1.0})
    rest = token_loss(hidden[3:], head, targets[3:], TopK(*(v[3:] for v in teacher[:3]), (1.0,)), **kw)
    torch.testing.assert_close(mixed.loss, first.loss + rest.loss)


def test_the_sampled_token_loss_is_sent_one_log_prob_a_token():
    """Training rows of the sampled-token loss get the teacher's log-probability of each sampled
    token alone (4 bytes a token), the same one as in the full signal; held-out rows, which are
    scored, still get the top-k and the tail."""
    from kd_ray.spec import parse
    from kd_ray.tasks.causal_lm import CausalLM

    vocab, seq = 61, 24
    spec = parse({"task": "causal_lm", "run": {"name": "t"}, "data": {"source": "x.jsonl", "tokenizer": "tok.json", "packing": "pad"},
                  "teacher": {"model": "llama"}, "student": {"model": "llama"},
                  "distill": {"loss": "sampled_token", "top_k": 6, "chunk_tokens": 16},
                  "onpolicy": {"prompt_tokens": 4, "max_new_tokens": 8},
                  "train": {"max_steps": 1, "global_batch_size": 2, "micro_batch_size": 1}})
    task = CausalLM(spec)
    task.__dict__["vocab"] = vocab  # no tokenizer to ask
    teacher = _tiny_lm(vocab)[0]
    tokens = torch.randint(0, vocab, (3, seq))
    targets = torch.roll(tokens, -1, dims=1)
    targets[:, :5] = IGNORE  # the prompt
    targets[1, 15:] = IGNORE  # stopped early
    batch = {TOKENS: tokens, TOKEN_POS: torch.arange(seq).expand(3, seq), TARGETS: targets}
    cpu = torch.device("cpu")
    full = task.teacher_tensors(teacher, batch, cpu, "fp32")
    lean = task.teacher_tensors(teacher, batch, cpu, "fp32", for_loss=True)
    assert set(lean) == {TARGET_LOGPROB} and lean[TARGET_LOGPROB].dtype == torch.float32
    assert lean[TARGET_LOGPROB].element_size() * lean[TARGET_LOGPROB][0].numel() == 4 * seq
    assert {TOPK_VALUES, TOPK_INDICES, TAIL_LSE, TARGET_LOGPROB} <= set(full)
    torch.testing.assert_close(lean[TARGET_LOGPROB], full[TARGET_LOGPROB], rtol=0, atol=1e-5)
    dense = torch.log_softmax(teacher(input_ids=tokens).logits[..., :vocab].float(), -1)
    keep = targets >= 0
    torch.testing.assert_close(lean[TARGET_LOGPROB][keep], dense[keep].gather(-1, targets[keep][:, None])[:, 0], rtol=0, atol=1e-5)
    assert (lean[TARGET_LOGPROB][~keep] == 0).all()


def _job(tmp_path, **sections) -> dict:
    job = {"task": "causal_lm", "run": {"name": "op", "storage_path": str(tmp_path)},
           "data": {"source": "builtin:kjv", "text": "text", "max_seq_len": 64, "packing": "pad", "tokenizer": "teacher"},
           "teacher": {"model": "teacher_dir"}, "student": {"model": "llama"},
           "distill": {"loss": "reverse_kl", "temperature": 1.0},
           "onpolicy": {"prompt_tokens": 8, "max_new_tokens": 16},
           "train": {"max_steps": 2, "global_batch_size": 4, "micro_batch_size": 2}}
    for name, values in sections.items():
        if values is None:
            job.pop(name, None)
        else:
            job[name] = {**job.get(name, {}), **values}
    return job


@pytest.mark.parametrize("change,field,words", [
    (dict(data={"packing": "pack"}), "data.packing", "packing: pad"),
    (dict(onpolicy={"prompt_tokens": None}), "onpolicy.prompt_tokens", "set onpolicy.prompt_tokens"),
    (dict(onpolicy={"max_new_tokens": 64}), "onpolicy.max_new_tokens", "at most 63"),
    (dict(onpolicy={"prompt_tokens": 64}), "onpolicy.prompt_tokens", "at most 63"),
    (dict(onpolicy={"sync_every": 3, "max_staleness": 1}), "onpolicy.sync_every", "max_staleness + 1"),
    (dict(distill={"loss": "sampled_token"}, onpolicy={"fraction": 0.5}), "distill.loss", "onpolicy.fraction: 1"),
    (dict(distill={"loss": "sampled_token", "temperature": 2.0}), "distill.temperature", "1.0"),
    (dict(distill={"loss": "sampled_token"}, onpolicy={"temperature": 0.7}), "onpolicy.temperature", "top_p: 1.0"),
    (dict(distill={"loss": "sampled_token"}, onpolicy={"top_p": 0.9}), "onpolicy.top_p", "temperature: 1.0"),
    (dict(onpolicy=None, distill={"loss": "sampled_token"}), "distill.loss", "add an onpolicy section"),
    (dict(teacher=None, data={"tokenizer": "tok.json"}), "onpolicy", "add a teacher section"),
    (dict(teacher={"mode": "cached", "cache": {"path": "c"}}), "teacher.mode", "teacher.mode: online"),
    (dict(data={"text": None, "prompt": "p", "response": "r"}), "onpolicy.prompt_tokens", "remove"),
])
def test_on_policy_mistakes_are_one_line_naming_the_field(tmp_path, change, field, words):
    from kd_ray.spec import parse
    from kd_ray.tasks.causal_lm_checks import check_onpolicy

    raw = _job(tmp_path, **change)
    if "text" in raw["data"] and raw["data"]["text"] is None:
        del raw["data"]["text"]
    if raw.get("onpolicy") and raw["onpolicy"].get("prompt_tokens", 0) is None:
        del raw["onpolicy"]["prompt_tokens"]
    with pytest.raises(UserError) as e:
        check_onpolicy(parse(raw, str(tmp_path)))
    assert e.value.field == field and words in e.value.message and "\n" not in e.value.message


def test_a_classifier_refuses_on_policy(tmp_path):
    from kd_ray.spec import parse
    from kd_ray.tasks.classify_checks import check_classifier

    raw = {"run": {"name": "c", "storage_path": str(tmp_path)}, "data": {"source": "builtin:digits"},
           "student": {"model": "mlp"}, "onpolicy": {}, "train": {"max_steps": 2, "global_batch_size": 4, "micro_batch_size": 2}}
    with pytest.raises(UserError) as e:
        check_classifier(parse(raw, str(tmp_path)))
    assert e.value.field == "onpolicy"
