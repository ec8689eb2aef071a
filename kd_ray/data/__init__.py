"""Samples flowing from a source to the teacher and the student.

Every dataset kd_ray builds has the same columns, whatever the source:
  id (int64, stable per sample), x (float32 features, any shape), y (int64 label),
training rows also carry their position, and, after the teacher pool, teacher_logits.
"""

ID, X, Y, TEACHER = "id", "x", "y", "teacher_logits"

# A training row's position in the run: epoch x rows per epoch + its place in that epoch's order
# (see kd_ray.data.order). The data cursor, and how the loop checks it got the rows it expects.
POS = "position"
