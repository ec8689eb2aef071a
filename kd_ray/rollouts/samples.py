"""A finished on-policy run's samples: for the first onpolicy.samples held-out prompts, the
student's continuation beside the teacher's, sampled with the same seed each (the seed an
evaluation gives the prompt), written to RUN_DIR/samples.md. In a Ray task: the driver holds no
model."""

from __future__ import annotations

import ray
import torch

from kd_ray.core import storage
from kd_ray.core.columns import DOCS, ID, TARGETS, TOKENS
from kd_ray.core.imports import make_importable
from kd_ray.core.seeds import EVAL_ROLLOUT, rollout_seed
from kd_ray.models.decoder import decoder_and_head, sliced_head
from kd_ray.rollouts.sampling import generate, hf_decoder, prompt_length

SAMPLES_FILE = "samples.md"


@ray.remote(num_cpus=1)
def _continuations(spec, task, rows: list[dict]) -> str:
    make_importable(spec.job_dir)
    o, device = spec.onpolicy, torch.device("cpu")
    models = {"student": task.load_exported(task.exported(spec.run_dir)).lm, "teacher": task.load_teacher(device)}
    cut = [prompt_length(r[TOKENS], r[TARGETS], r[DOCS], o.prompt_tokens) for r in rows]
    prompts = [r[TOKENS][:p] for r, p in zip(rows, cut)]
    seeds = [rollout_seed(spec.run.seed, EVAL_ROLLOUT, int(r[ID])) for r in rows]
    limits = [min(o.max_new_tokens, len(r[TOKENS]) - p) for r, p in zip(rows, cut)]
    eos = task.tokenizer.eos_token_id if o.stop_on_eos else None
    made = {}
    for name, lm in models.items():
        decoder, head = decoder_and_head(lm.eval())
        made[name] = generate(hf_decoder(decoder), sliced_head(head, task.vocab, "fp32", device), prompts, seeds, limits,
                              width=o.prompt_tokens or spec.data.max_seq_len - 1, batch=o.pool.batch_size,
                              temperature=o.temperature, top_p=o.top_p, eos=eos, device=device)
    decode = task.tokenizer.decode
    lines = [f"# Samples of run {spec.run.name}", "",
             f"Held-out prompts, each continued by the student and by the teacher with the same seed (temperature "
             f"{o.temperature}, top-p {o.top_p}, at most {o.max_new_tokens} new tokens).", ""]
    for i, prompt in enumerate(prompts):
        lines += [f"## Prompt {i + 1} (id {int(rows[i][ID])})", "", "> " + decode(prompt).replace("\n", "\n> "), ""]
        for name in models:
            lines += [f"**{name}:** " + decode(made[name][i].tokens).replace("\n", " "), ""]
    return "\n".join(lines)


def write_samples(spec, task, eval_dataset) -> str:
    """RUN_DIR/samples.md from the first onpolicy.samples rows of the eval split; returns its path."""
    rows = eval_dataset.take(spec.onpolicy.samples)
    path = storage.join(spec.run_dir, SAMPLES_FILE)
    storage.write_bytes(path, ray.get(_continuations.remote(spec, task, rows)).encode())
    return path
