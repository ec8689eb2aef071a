"""The teacher-output cache: captured once by `kd-ray cache`, verified, read per shard.

    manifest          what a cache stands for (the job's identity), its layout, how a job is compared with it
    capture           `kd-ray cache`: the shards written by the job's teacher pool, resumable
    reader            training from a cache: checked shard by shard, read back into the stream
    samples, tokens   the codecs of a per-sample and a per-token teacher signal
    files             a cache's files: names, parquet bytes, a store of whole files (local or a bucket)

This module imports nothing, so that each part can be imported alone.
"""
