"""Samples flowing from a source to the teacher and the student.

Every dataset kd_ray builds has the same columns, whatever the source:
  id (int64, stable per sample), x (float32 features, any shape), y (int64 label),
training rows also carry their position, and, after the teacher pool, teacher_logits (or, from a
top-k cache, the three teacher_topk/tail columns).
"""

ID, X, Y, TEACHER = "id", "x", "y", "teacher_logits"

# A training row's position in the run: epoch x rows per epoch + its place in that epoch's order
# (see kd_ray.data.order). The data cursor, and how the loop checks it got the rows it expects.
POS = "position"

# A top-k teacher-output cache (kd_ray.cache) adds these instead of TEACHER: the teacher's k largest
# T=1 log-probabilities (float16 or float32, or bfloat16 carried as its uint16 bits: numpy has no
# bfloat16), their class ids, and log sum over the other classes of exp(log p / T) at the job's
# temperature: the fields of kd_ray.losses.TopK.
TOPK_VALUES, TOPK_INDICES, TAIL_LSE = "teacher_topk_values", "teacher_topk_indices", "teacher_tail_lse"
# A language model's teacher also sends, per token, the log-probability of the real next token
# (its perplexity on the eval split needs nothing else).
TARGET_LOGPROB = "teacher_target_logprob"
