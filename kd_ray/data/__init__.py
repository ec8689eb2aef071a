"""Samples flowing from a source to the teacher and the student.

Every dataset kd_ray builds has the same columns, whatever the source:
  id (int64, stable per sample), x (float32 features, any shape), y (int64 label),
and, after the teacher pool, teacher_logits.
"""

ID, X, Y, TEACHER = "id", "x", "y", "teacher_logits"

# Which pass over the data a training row belongs to (the train stream holds all passes).
EPOCH = "epoch"
