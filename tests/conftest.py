"""One real local Ray cluster for the whole test session.

Started with `ray start --head` on 127.0.0.1 (so tests can also `ray job submit` to it and add
worker nodes), with more logical CPUs than physical cores: Train workers and teacher actors hold
their CPUs for a whole run, and on 2 cores they would otherwise wait on each other forever.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, tmp: str):
        self.port = free_port()
        self.dashboard_port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.tmp = tmp

    def env(self) -> dict:
        """Environment for a subprocess (the kd-ray CLI) that should join this cluster."""
        return {**os.environ, "RAY_ADDRESS": self.address, "PYTHONUNBUFFERED": "1"}

    def start(self) -> None:
        cmd = [
            "ray", "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(self.port),
            "--num-cpus", "10", "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(self.dashboard_port), "--disable-usage-stats",
            # Its own port for the agent that `ray job submit` goes through: the default (52365) is
            # taken by any other cluster on the machine, and then no job can be submitted here.
            "--dashboard-agent-listen-port", str(free_port()),
        ]
        # A loaded 2-core machine can take minutes to bring the dashboard's modules up; Ray's
        # default deadlines then fail the whole session's start.
        slow = {"RAY_DASHBOARD_STARTUP_TIMEOUT_S": "240", "RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT": "180"}
        subprocess.run(cmd, check=True, capture_output=True, env={**slow, **os.environ, "RAY_ADDRESS": ""})

    def stop(self) -> None:
        """Stop this cluster's processes only (`ray stop` would also stop any other cluster on the
        machine, such as a second test session's): the ones that name its GCS port on their
        command line, and their children."""
        # The GCS may advertise the machine's own address rather than 127.0.0.1: match the port.
        mark = re.compile(rb"(gcs-address=|gcs_server_port=|address=)[^\0 ]*?\b%d\b" % self.port)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            procs = {}
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmd = f.read()
                    with open(f"/proc/{pid}/stat", "rb") as f:
                        ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                procs[int(pid)] = (cmd, ppid)
            ours = {pid for pid, (cmd, _) in procs.items() if mark.search(cmd) and pid != os.getpid()}
            while True:
                more = {pid for pid, (_, ppid) in procs.items() if ppid in ours} - ours
                if not more:
                    break
                ours |= more
            for pid in ours:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            time.sleep(2)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    import ray

    cluster = Cluster(str(tmp_path_factory.mktemp("ray")))
    cluster.start()
    os.environ["RAY_ADDRESS"] = cluster.address
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.stop()


def run_cli(args: list[str], cluster: Cluster | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    env = cluster.env() if cluster else {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "kd_ray", *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def cli(args: list[str], cluster: Cluster, env_extra: dict | None = None, stdout=subprocess.PIPE) -> subprocess.Popen:
    """`kd-ray ARGS` in a process of its own, joined to the session's cluster, its console (stdout
    and stderr together) to `stdout`: a process the test can signal, kill or read line by line."""
    return subprocess.Popen([sys.executable, "-m", "kd_ray", *args], env={**cluster.env(), **(env_extra or {})}, cwd=ROOT,
                            text=True, stdout=stdout, stderr=subprocess.STDOUT)


def in_background(args: list[str], cluster: Cluster, log) -> subprocess.Popen:
    """`kd-ray ARGS` in a process of its own, its console to the file `log`, while the test goes on."""
    with open(log, "w") as f:
        return cli(args, cluster, stdout=f)


@pytest.fixture
def background(ray_cluster):
    """background(args, log): `kd-ray ARGS` alongside the test (in_background); what still runs when
    the test ends is killed."""
    procs: list[subprocess.Popen] = []

    def start(args: list[str], log) -> subprocess.Popen:
        procs.append(in_background(args, ray_cluster, log))
        return procs[-1]

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def run_here(args: list[str]) -> subprocess.CompletedProcess:
    """`kd-ray ARGS` in this process, joined to the session's cluster: the CLI's own code, exit
    code and printed lines, without the new interpreter's import of torch and Ray and its
    connection to the cluster (10-20 s on a busy 2-core machine). Tests that signal or kill the
    driver, or that read what Ray itself prints on the console, keep run_cli."""
    import contextlib
    import io

    from kd_ray.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return subprocess.CompletedProcess(["kd-ray", *args], code, out.getvalue(), err.getvalue())


def write_job(path, job: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return str(path)


def digits_job(tmp_path, name: str, **sections) -> dict:
    """A small job on the built-in digits, in tmp_path; sections override whole keys."""
    job = {
        "run": {"name": name, "storage_path": str(tmp_path / "runs"), "seed": 0},
        "data": {"source": "builtin:digits", "shape": [1, 8, 8], "preprocess": {"scale": 0.0625}, "eval_split": 0.2},
        "student": {"model": "mlp", "kwargs": {"in_features": 64, "num_classes": 10, "hidden": 32, "depth": 1}},
        "train": {"epochs": 2, "global_batch_size": 64, "micro_batch_size": 16, "num_workers": 2,
                  "optimizer": {"name": "adamw", "lr": 0.01}, "log_every": 10},
        # Pictures are drawn where a test looks at them (test_end_to_end): a few seconds a run.
        "logging": {"report": False},
    }
    job.update(sections)
    return job


TEACHER_SPEC = {"model": "convnet", "kwargs": {"in_channels": 1, "num_classes": 10, "width": 16, "blocks": 2}}


@pytest.fixture(scope="session")
def teacher_weights(tmp_path_factory) -> str:
    """A conv-net teacher trained once per session on the digits' train split (the ids the jobs
    below hold out stay unseen), by a plain torch loop: a few seconds, where a kd-ray run costs
    a minute of Ray start-up that the supervised end-to-end tests already pay."""
    import torch
    from sklearn.datasets import load_digits

    from kd_ray.data.ids import is_eval
    from kd_ray.models.registry import build_model
    from kd_ray.models.weights import save

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) * 0.0625  # the jobs' data.preprocess.scale
    y = torch.tensor(y)
    train = ~torch.from_numpy(is_eval(np.arange(len(y)), 0.2, 0))  # builtin:digits ids are row numbers
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors on a busy 2-core machine: a second thread only waits
    try:
        torch.manual_seed(0)
        teacher = build_model(TEACHER_SPEC["model"], TEACHER_SPEC["kwargs"])
        optimizer = torch.optim.AdamW(teacher.parameters(), lr=0.003)
        xt, yt = x[train], y[train]
        for _ in range(4):
            for batch in torch.randperm(len(yt)).split(64):
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(teacher(xt[batch]), yt[batch]).backward()
                optimizer.step()
        teacher.eval()
        with torch.no_grad():
            accuracy = (teacher(x[~train]).argmax(1) == y[~train]).float().mean().item()
    finally:
        torch.set_num_threads(threads)
    assert accuracy > 0.95, accuracy
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save(teacher.state_dict(), str(path))
    return str(path)


def kd_job(tmp_path, name: str, teacher_weights: str, **train) -> dict:
    """The digits job distilled from the session's teacher, online (a pool of 1 to 2 actors)."""
    job = digits_job(tmp_path, name)
    job["teacher"] = {**TEACHER_SPEC, "weights": teacher_weights, "pool": {"min_actors": 1, "max_actors": 2, "batch_size": 64}}
    job["distill"] = {"temperature": 2.0, "alpha": 0.5}
    job["train"].update(train)
    return job


@pytest.fixture(scope="session")
def online_kd_run(ray_cluster, teacher_weights, tmp_path_factory) -> dict:
    """One online distillation run through the CLI (2 DDP workers, a profiled window of steps),
    shared: test_end_to_end checks the run itself, and test_cache trains the same job from a
    cache of the same teacher and compares the weights (one run of each, not two)."""
    tmp = tmp_path_factory.mktemp("online_kd")
    job = kd_job(tmp, "kd_ddp", teacher_weights, strategy="ddp")
    job["profile"] = {"start_step": 3, "steps": 2}
    job["logging"] = {"mlflow": {"tracking_uri": str(tmp / "mlruns"), "experiment": "kd_tests"}}  # TensorBoard: on by default
    path = write_job(tmp / "kd.yaml", job)
    return {"job": job, "path": path, "proc": run_here(["run", path]), "run_dir": tmp / "runs" / "kd_ddp"}


def assert_trained_alike(summary: dict, reference: dict, atol: float = 1e-6) -> None:
    """Two finished runs' summaries: the same student weights (to `atol`), scores and teacher accuracy."""
    import torch

    from kd_ray.models.weights import read_state_dict

    mine = read_state_dict(summary["student_weights"])
    for name, value in read_state_dict(reference["student_weights"]).items():
        torch.testing.assert_close(mine[name], value, rtol=0, atol=atol)
    assert summary["student"] == reference["student"]
    assert summary["teacher"]["accuracy"] == reference["teacher"]["accuracy"] > 0.9


def _gloo_worker(rank: int, port: int, out_dir: str, cases, world: int, backend: str = "gloo") -> None:
    """One rank: join the process group (gloo, or NCCL for the CUDA tests), run each (name, thunk) of cases(rank) (a failure is kept as
    its traceback, and the ranks meet after each), save {name: result} to out_dir/rank{R}.pt."""
    import traceback

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    results: dict = {}
    try:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        for name, thunk in cases(rank):
            try:
                results[name] = thunk()
            except Exception:
                results[name] = traceback.format_exc()
            dist.barrier()
        dist.destroy_process_group()
    except Exception:
        results["error"] = traceback.format_exc()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def spawn_gloo(cases, world: int, out_dir: str, timeout: float, backend: str = "gloo") -> list[dict]:
    """Run the (name, thunk) pairs of cases(rank) in `world` spawned processes that form a gloo
    group on 127.0.0.1 (real torch.distributed, no Ray); returns each rank's {name: result}.
    `cases` must be a module-level function (it is pickled into the processes)."""
    import torch
    import torch.multiprocessing as mp

    env = {"MASTER_ADDR": "127.0.0.1"}
    if os.path.isdir("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo would otherwise resolve the host name
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        ctx = mp.spawn(_gloo_worker, args=(free_port(), out_dir, cases, world, backend), nprocs=world, join=False)
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for proc in ctx.processes:
                    proc.kill()
                pytest.fail(f"the {world} gloo processes did not finish within {timeout}s")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    results = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r} failed to set up:\n{res['error']}"
    return results


@pytest.fixture
def wait_for():
    def _wait(pred, timeout=60.0, interval=0.5):
        end = time.time() + timeout
        while time.time() < end:
            if pred():
                return True
            time.sleep(interval)
        return False

    return _wait


def docs_table(page: str, after: str) -> dict[str, list[str]]:
    """The first markdown table after the line of docs/PAGE that contains `after`: its rows by
    their first cell, each row's cells as written (a figure the docs state, for a test that
    measures it to compare with)."""
    with open(os.path.join(ROOT, "docs", page)) as f:
        lines = f.read().splitlines()
    start = next(i for i, line in enumerate(lines) if after in line)
    rows = {}
    for line in lines[start:]:
        if line.startswith("|"):
            cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
            if not set(cells[0]) <= set("-: "):
                rows[cells[0]] = cells[1:]
        elif rows:
            break
    return rows


def stated(cell: str) -> float:
    """A figure as the docs write it: '3,402', '163.2', '27 (k=5)'."""
    return float(cell.split()[0].replace(",", ""))


# A causal LM teacher for the language-model tests, trained once per session.
SEQ, CHAPTERS = 128, 260
TEACHER_LLAMA = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     max_position_embeddings=256)


def _tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.fixture(scope="session")
def lm_teacher(tmp_path_factory) -> dict:
    """A tokenizer and a teacher trained on the first chapters (the student's data); the data as
    JSON lines, one chapter a line."""
    import json

    import torch

    from kd_ray.data.text import kjv_chapters
    from kd_ray.data.tokens import make_rows
    from kd_ray.models.lm import llama

    root = tmp_path_factory.mktemp("lm")
    chapters = kjv_chapters()[:CHAPTERS]
    data = root / "kjv.jsonl"
    data.write_text("".join(json.dumps({"text": c["text"]}) + "\n" for c in chapters))
    tokenizer = _tokenizer([c["text"] for c in kjv_chapters()[:600]])
    docs = [np.array(tokenizer(c["text"])["input_ids"] + [tokenizer.eos_token_id]) for c in chapters]
    rows = make_rows(((d, np.ones(len(d), bool)) for d in docs), SEQ, "pack")
    tokens, positions, targets = (torch.from_numpy(a).long() for a in (rows.tokens, rows.positions, rows.targets))
    torch.manual_seed(0)
    teacher = llama(vocab_size=len(tokenizer), **TEACHER_LLAMA)
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    for _ in range(400):
        pick = torch.randint(0, len(tokens), (16,))
        logits = teacher(input_ids=tokens[pick], position_ids=positions[pick], use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets[pick].flatten(), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    teacher.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    return {"root": root, "data": str(data), "teacher": str(root / "teacher"), "train_loss": loss.item()}
