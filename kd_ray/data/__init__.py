"""Samples flowing from a source to the teacher and the student: sources and stable ids
(sources, ids), the order of every epoch (order), preprocessing and augmentation (transforms),
documents to token rows (text, tokens), and the streams that carry rows to the teacher and the
trainers (chunks, streams, local). Column names: kd_ray.core.columns."""
