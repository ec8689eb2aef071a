"""The names of the columns that flow from a source to the teacher and the student: one home.

Every dataset kd_ray builds has the same columns, whatever the source. A classifier's row:
  id (int64, stable per sample), x (float32 features, any shape), y (int64 label).
A causal LM's row: a window of token ids, its shifted targets (-100 where no loss), each token's
document index and its position in that document (kd_ray.data.tokens), and an id.
Training rows also carry their position in the run, and, after the teacher, its signal.
"""

ID, X, Y, TEACHER = "id", "x", "y", "teacher_logits"

TOKENS, TARGETS, DOCS, TOKEN_POS = "tokens", "targets", "docs", "token_positions"

# A training row's position in the run: epoch x rows per epoch + its place in that epoch's order
# (see kd_ray.data.order). The data cursor, and how the loop checks it got the rows it expects.
POS = "position"

# A top-k teacher signal (a language model's teacher always; a classifier's from a top-k cache):
# the teacher's k largest T=1 log-probabilities (float16 or float32, or bfloat16 carried as its
# uint16 bits: numpy has no bfloat16), their class ids, and log sum over the other classes of
# exp(log p / T) at the job's temperature: the fields of kd_ray.losses.TopK.
TOPK_VALUES, TOPK_INDICES, TAIL_LSE = "teacher_topk_values", "teacher_topk_indices", "teacher_tail_lse"
# A language model's teacher also sends, per token, the log-probability of the real next token
# (its perplexity on the eval split needs nothing else).
TARGET_LOGPROB = "teacher_target_logprob"
# On-policy (kd_ray.rollouts): a row's weights version, the student's weights it was generated from
# (-1: the data's own row), and per generated token the log-probability (T = 1) of the sampled
# token under those weights (0 elsewhere): the importance weight of a stale rollout's tokens.
ROLLOUT, SAMPLE_LOGPROB = "rollout_version", "sample_logprob"

# A cache shard's own columns (kd_ray.cache): a row's place within its unit, and the digest of the
# row's input as the source gave it (kd_ray.core.hashing.input_digests).
ROW, INPUT = "row", "input_digest"
