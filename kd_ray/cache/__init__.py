"""The teacher-output cache: captured once by `kd-ray cache`, verified, read per shard.

    teacher_outputs   the manifest (what a cache stands for), the capture, the training reader
    samples, tokens   the codecs of a per-sample and a per-token teacher signal
    files             a cache's files: names, parquet bytes, a store of whole files (local or a bucket)

This module imports nothing, so that each part can be imported alone.
"""
