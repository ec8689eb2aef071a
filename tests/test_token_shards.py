"""A language model's token shards (kd_ray.data.token_shards): prepared once by Ray tasks, one per
piece of the source, read row group by row group; the same rows whatever the source's form and
cut; a preparation killed part-way finished by the next, a damaged shard named and rewritten; a
streamed run that loses a worker trains every row once per epoch."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import faults
import numpy as np
import pytest
from conftest import ROOT, run_here, write_job

from kd_ray.core.columns import DOCS, TOKENS
from kd_ray.core.errors import UserError

CHAPTERS = 240


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """KJV chapters as JSON lines, and a tokenizer trained on them."""
    from test_lm_end_to_end import _tokenizer

    from kd_ray.data.text import kjv_chapters

    root = tmp_path_factory.mktemp("shards")
    chapters = kjv_chapters()[:CHAPTERS]
    lines = "".join(json.dumps({"text": c["text"]}) + "\n" for c in chapters)
    (root / "kjv.jsonl").write_text(lines)
    tok = _tokenizer([c["text"] for c in chapters])
    tok.save_pretrained(root / "tok")
    return {"root": root, "lines": lines, "chapters": chapters, "tokenizer": str(root / "tok" / "tokenizer.json")}


def _job(corpus, source, prepared, **data) -> dict:
    return {"task": "causal_lm", "run": {"name": "lm", "storage_path": str(corpus["root"] / "runs"), "seed": 0, "deterministic": True},
            "data": {"source": source if isinstance(source, list) else str(source), "text": "text", "tokenizer": corpus["tokenizer"], "max_seq_len": 128, "eval_split": 0.1,
                     "prepared": str(prepared), **data},
            "student": {"model": "llama", "kwargs": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                                     "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 256}},
            "train": {"max_steps": 4, "global_batch_size": 8, "micro_batch_size": 4},
            "eval": {"every_epochs": 0}}


def _spec(tmp_path, job: dict):
    from kd_ray.checks import load_job

    return load_job(write_job(tmp_path / "specs" / f"{uuid.uuid4().hex[:8]}.yaml", job), [])


def _prepare(spec, lines: list | None = None):
    from kd_ray.data.token_shards import prepare
    from kd_ray.models import lm as lms
    from kd_ray.tasks.build import task_for

    task = task_for(spec)
    echo = (lines.append if lines is not None else lambda _: None)
    return prepare(spec, task.tokenizer, task.vocab, lms.tokenizer_digest(task.tokenizer), echo=echo)


def _rows(prepared, split: str) -> dict:
    from kd_ray.data.token_shards import TokenShardReader

    reader = TokenShardReader(prepared, split, 0)
    ids = reader.unit_ids()
    units = np.concatenate([np.full(len(i), u) for u, i in enumerate(ids)]) if ids else np.zeros(0, np.int64)
    rows = np.concatenate([np.arange(len(i)) for i in ids]) if ids else np.zeros(0, np.int64)
    return reader.read(units, rows)


def _tokens(rows: dict) -> np.ndarray:
    """The tokens every row holds (padding left out), sorted: a packing's content, whatever its cut."""
    return np.sort(rows[TOKENS][rows[DOCS] >= 0])


def test_pieces_number_documents_as_one_read_and_every_form_of_a_source_gives_the_same_rows(ray_cluster, corpus, tmp_path, monkeypatch):
    """A source cut into pieces (several tasks) splits the same documents into train and eval
    as one piece does, each document once; the source as .jsonl.gz, .jsonl.zst, parquet of small
    row groups, a directory and a glob gives the same rows; a second preparation does nothing."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kd_ray.data import text

    one_lines: list[str] = []
    one = _prepare(_spec(tmp_path, _job(corpus, corpus["root"] / "kjv.jsonl", tmp_path / "one")), one_lines)
    assert [f["piece"] for f in one.manifest["files"]] == [0, 0] and "1 of 1 pieces" in one_lines[0]
    again: list[str] = []
    assert _prepare(_spec(tmp_path, _job(corpus, corpus["root"] / "kjv.jsonl", tmp_path / "one")), again).root == one.root and not again

    # The source touched: prepared again (its identity is its files' sizes and times), to the same
    # bytes, so the rows' identity (what a teacher cache is checked against) is unchanged.
    from kd_ray.data.token_shards import TokenShardReader

    touched = tmp_path / "touched.jsonl"
    touched.write_text(corpus["lines"])
    first = _prepare(_spec(tmp_path, _job(corpus, touched, tmp_path / "one")))
    os.utime(touched, (1e9, 1e9))
    second = _prepare(_spec(tmp_path, _job(corpus, touched, tmp_path / "one")))
    assert first.root != second.root
    assert TokenShardReader(first, "train", 0).identity() == TokenShardReader(second, "train", 0).identity()

    monkeypatch.setattr(text, "PIECE_BYTES", 60_000)  # cut on the driver: about 12 pieces
    cut = _prepare(_spec(tmp_path, _job(corpus, corpus["root"] / "kjv.jsonl", tmp_path / "cut")))
    assert len({f["piece"] for f in cut.manifest["files"]}) > 8
    for split in ("train", "eval"):
        assert cut.manifest["totals"][split]["documents"] == one.manifest["totals"][split]["documents"]
        assert np.array_equal(_tokens(_rows(cut, split)), _tokens(_rows(one, split))), split
    assert one.manifest["totals"]["eval"]["documents"] + one.manifest["totals"]["train"]["documents"] == CHAPTERS

    forms = tmp_path / "forms"
    (forms / "dir" / "nested").mkdir(parents=True)
    with gzip.open(forms / "kjv.jsonl.gz", "wt") as f:
        f.write(corpus["lines"])
    with pa.CompressedOutputStream(str(forms / "kjv.jsonl.zst"), "zstd") as f:
        f.write(corpus["lines"].encode())
    table = pa.table({"text": [c["text"] for c in corpus["chapters"]]})
    pq.write_table(table, forms / "kjv.parquet", row_group_size=16)
    # A directory of two files (their documents numbered in sorted order) with a marker file left out.
    half = corpus["lines"].splitlines(keepends=True)
    (forms / "dir" / "a.jsonl").write_text("".join(half[:100]))
    pq.write_table(table.slice(100), forms / "dir" / "nested" / "b.parquet", row_group_size=50)
    (forms / "dir" / "_SUCCESS").write_text("")
    for source in ("kjv.jsonl.gz", "kjv.jsonl.zst", "kjv.parquet", "dir", "dir/**/*.*", ["dir/a.jsonl", "dir/nested/b.parquet"],
                   "file://"):
        given = [str(forms / s) for s in source] if isinstance(source, list) else \
            f"file://{forms}/kjv.jsonl.zst" if source == "file://" else forms / source
        got = _prepare(_spec(tmp_path, _job(corpus, given, tmp_path / "forms_prepared")))
        for split in ("train", "eval"):
            assert got.manifest["totals"][split]["documents"] == one.manifest["totals"][split]["documents"], (source, split)
            assert np.array_equal(_tokens(_rows(got, split)), _tokens(_rows(one, split))), (source, split)
        if source in ("kjv.jsonl.gz", "kjv.jsonl.zst"):  # one piece, as the plain file: the very same rows
            for split in ("train", "eval"):
                a, b = _rows(got, split), _rows(one, split)
                assert all(np.array_equal(a[k], b[k]) for k in a), (source, split)


def test_max_documents_counts_across_pieces(ray_cluster, corpus, tmp_path, monkeypatch):
    from kd_ray.data import text

    whole = _prepare(_spec(tmp_path, _job(corpus, corpus["root"] / "kjv.jsonl", tmp_path / "a", max_documents=150)))
    monkeypatch.setattr(text, "PIECE_BYTES", 60_000)
    cut = _prepare(_spec(tmp_path, _job(corpus, corpus["root"] / "kjv.jsonl", tmp_path / "b", max_documents=150)))
    assert sum(t["documents"] for t in whole.manifest["totals"].values()) == 150
    for split in ("train", "eval"):
        assert np.array_equal(_tokens(_rows(cut, split)), _tokens(_rows(whole, split))), split


def test_a_killed_preparation_is_finished_by_the_next_and_a_damaged_shard_is_named_and_rewritten(ray_cluster, corpus, tmp_path):
    """`kd-ray prepare` SIGKILLed once its first pieces are written: the next writes only the
    others, keeping those, and the rows are a preparation's in one go. A shard damaged on disk:
    a run's read names it and the command that rewrites it; `kd-ray prepare` finds and rewrites
    it; a shard cut short is prepared again by the run itself."""
    from kd_ray.data import token_shards

    src = tmp_path / "src"
    src.mkdir()
    lines = corpus["lines"].splitlines(keepends=True)
    for i in range(40):  # 40 files: 40 pieces, 40 tasks
        (src / f"part-{i:02d}.jsonl").write_text("".join(lines[i * 6:(i + 1) * 6]))
    path = write_job(tmp_path / "job.yaml", _job(corpus, src, tmp_path / "prepared"))
    proc = subprocess.Popen([sys.executable, "-m", "kd_ray", "prepare", path], env=ray_cluster.env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, written = time.time() + 240, []
    while time.time() < deadline and proc.poll() is None:
        written = [p for p in (tmp_path / "prepared").glob("*/train/piece-*.parquet")]
        if written:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert written, "no piece was written before the preparation ended"
    root = written[0].parent.parent
    assert not (root / "manifest.json").exists(), "the preparation finished before it was killed: nothing to resume"
    before = {p.name: os.stat(p) for p in (root / "train").glob("piece-*.parquet") if (root / "eval" / p.name).exists()}

    proc = run_here(["prepare", path])
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    todo = int(proc.stdout.split("preparing token shards of ")[1].split(" of ")[0])
    assert 1 <= todo <= 40 - len(before), proc.stdout  # a task the kill cut short may still have finished its piece
    for name, st in before.items():
        now = os.stat(root / "train" / name)
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), name
    assert not [p for p in root.rglob(".tmp-*")], "a cut-off write's temporary file was left"

    from kd_ray.data.token_shards import Prepared

    manifest = json.loads((root / "manifest.json").read_text())
    resumed = Prepared(str(root), manifest)
    whole = _prepare(_spec(tmp_path, _job(corpus, src, tmp_path / "one_go")))
    for split in ("train", "eval"):
        a, b = _rows(resumed, split), _rows(whole, split)
        assert all(np.array_equal(a[k], b[k]) for k in a), split

    # Damaged in the middle of its pages, the same size: the run's read names it.
    name = next(f["file"] for f in manifest["files"] if f["split"] == "train")
    victim = root / name
    data = bytearray(victim.read_bytes())
    data[len(data) // 3] ^= 0xFF
    victim.write_bytes(bytes(data))
    token_shards._READ.clear()  # this process read it whole before: as a new run's would, it reads it again
    with pytest.raises(UserError) as e:
        _rows(resumed, "train")
    assert e.value.field == "data.prepared" and name in e.value.message and "kd-ray prepare" in e.value.message
    proc = run_here(["prepare", path])
    assert proc.returncode == 0 and f"{name} " in proc.stdout, proc.stdout
    assert "preparing token shards of 1 of 40 pieces" in proc.stdout, proc.stdout
    a = _rows(Prepared(str(root), json.loads((root / "manifest.json").read_text())), "train")
    b = _rows(whole, "train")
    assert all(np.array_equal(a[k], b[k]) for k in a)

    # Cut short: the run's own check of the sizes finds it, and prepares that piece again.
    victim.write_bytes(victim.read_bytes()[:100])
    lines_seen: list[str] = []
    again = _prepare(_spec(tmp_path, _job(corpus, src, tmp_path / "prepared")), lines_seen)
    assert any("has another size" in line for line in lines_seen), lines_seen
    a = _rows(again, "train")
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_a_streamed_run_that_loses_a_worker_trains_every_row_once_per_epoch(ray_cluster, corpus, tmp_path):
    """Rows streamed from the shards row group by row group (data.in_memory_tokens: 0, several
    pieces, a global shuffle of windows of row groups): a worker killed at step 6, the group
    resumes from its checkpoint; each step trains its planned positions, and each epoch every
    train row once."""
    from test_fault_tolerance import surviving_steps

    src = tmp_path / "src"
    src.mkdir()
    lines = corpus["lines"].splitlines(keepends=True)
    for i in range(3):
        (src / f"part-{i}.jsonl").write_text("".join(lines[i * 40:(i + 1) * 40]))
    faults.install(tmp_path)
    trace, marks = tmp_path / "trace", tmp_path / "marks"
    trace.mkdir()
    marks.mkdir()
    job = _job(corpus, src, tmp_path / "prepared", in_memory_tokens=0, shuffle_window=2)
    job["run"]["storage_path"] = str(tmp_path / "runs")
    job["train"].update(max_steps=None, epochs=2, num_workers=2, global_batch_size=16)
    job["checkpoint"] = {"every_steps": 4, "poll_every_steps": 1}
    job["callbacks"] = [{"callable": "faults:Trace", "kwargs": {"directory": str(trace)}},
                        {"callable": "faults:DieAt", "kwargs": {"steps": [6], "marks": str(marks)}}]
    path = write_job(tmp_path / "job.yaml", job)
    proc = run_here(["run", path])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.load(open(tmp_path / "runs" / "lm" / "summary.json"))
    assert summary["restarts"] == 1, summary

    spec = _spec(tmp_path, job)
    prepared = _prepare(spec)
    train = _rows(prepared, "train")
    ids = set(train["id"].tolist())
    assert len({f["piece"] for f in prepared.manifest["files"]}) == 3 and len(ids) > 16
    steps = surviving_steps(trace)
    g = 16
    assert sorted(steps) == list(range(1, len(steps) + 1)) and len(steps) * g >= len(ids)
    for s, pairs in steps.items():
        assert [p for p, _ in pairs] == list(range((s - 1) * g, s * g)), f"step {s}"
    stream = [i for s in sorted(steps) for _, i in sorted(steps[s])]
    n = len(ids)
    assert sorted(stream[:n]) == sorted(ids)  # epoch 0: every row once
    assert len(set(stream[n:])) == len(stream[n:]) and set(stream[n:]) <= ids


def test_conversations_prepare_with_loss_on_the_assistants_turns(ray_cluster, corpus, tmp_path):
    from test_lm import CONVERSATION

    from kd_ray.data.text import chat_tokens
    from kd_ray.models import lm as lms

    convs = [[*CONVERSATION[:2], {"role": "assistant", "content": c["text"][:200]}] for c in corpus["chapters"][:30]]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"m": c}) + "\n" for c in convs))
    job = _job(corpus, tmp_path / "chat.jsonl", tmp_path / "prepared", text=None, messages="m", tokenizer="smollm2-135m-instruct",
               eval_split=0.0)
    got = _prepare(_spec(tmp_path, job))
    tok = lms.load_tokenizer("smollm2-135m-instruct", None)
    want = sum(int(chat_tokens(tok, c, "")[1].sum()) for c in convs)
    assert got.manifest["totals"]["train"]["documents"] == 30 and got.manifest["totals"]["train"]["loss_tokens"] == want
