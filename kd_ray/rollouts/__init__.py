"""On-policy distillation: the student generates, the teacher scores its tokens.

    prompts      the data's rows (data.packing: pad), each cut to its prompt (kd_ray.rollouts.sampling)
    versions     the Trainer publishes the student's weights every onpolicy.sync_every steps, as
                 files under RUN_DIR/policy (kd_ray.rollouts.versions); step s generates from
                 version w(s), the oldest published within onpolicy.max_staleness steps of s
    rollouts     Ray actors holding a copy of the student (kd_ray.rollouts.actor.RolloutWorker),
                 which each train worker sends its micro-batches to (kd_ray.train.onpolicy),
                 sample continuations with a KV cache, per prompt with a seed of (run seed,
                 step, prompt id), in fixed shapes: a rollout is a pure function of (prompt,
                 w(s), seed), so a restarted run regenerates the same rows
    teacher      teacher actors (or a colocated teacher) score the generated rows as any row:
                 top-k + tail + the sampled token's log-probability, the loss covering generated
                 tokens only
"""
