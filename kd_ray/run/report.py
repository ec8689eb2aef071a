"""Pictures of runs, drawn from their metrics.jsonl (kd_ray.run.metrics) with matplotlib: one per
run (RUN_DIR/report.png, which a finished run draws by itself), or one comparing several runs.

    training loss          the loss, and its KD and CE terms (one run)
    eval                   the student's accuracy (a language model: perplexity) and the teacher's
    throughput             samples (tokens) per second
    data wait              the share of each window the workers waited for batches
    teacher pool           actors working and their busy share (one run), or the busy share of each
    learning rate

Every panel's x axis is the optimizer step; dotted vertical lines mark where the worker group
restarted: a resume (a new driver), a resize (another world size) or a restart after a failure.
"""

from __future__ import annotations

import io
import os

from kd_ray.core import storage
from kd_ray.core.errors import UserError
from kd_ray.run.directory import DEFAULT_SCORES, read_summary
from kd_ray.run.metrics import read_metrics

REPORT = "report.png"
NO_MATPLOTLIB = "no picture of the run: matplotlib is not installed (pip install 'kd_ray[observe]')"


def draw_finished_run(run_dir: str) -> str:
    """What a finished run says about its picture."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return NO_MATPLOTLIB
    return f"picture of the run: {draw([run_dir])}"


def restarts(records: list[dict]) -> list[tuple[int, str]]:
    """(step, what happened) for each start after the first."""
    out, world, elapsed = [], None, 0.0
    for r in records:
        if r["kind"] == "start" and world is not None:
            if r.get("elapsed_seconds", 0.0) < elapsed:
                what = "resumed"  # a new driver: its clock starts again
            elif r["world_size"] != world:
                what = f"resized {world}->{r['world_size']}"
            else:
                what = "restarted"
            out.append((r["step"], what))
        if r["kind"] == "start":
            world = r["world_size"]
        elapsed = r.get("elapsed_seconds", elapsed)
    return out


def series(records: list[dict], kind: str, key, scale: float = 1.0) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` (a field, or a function of the record) over the records of a kind."""
    steps, values = [], []
    for r in records:
        if r["kind"] != kind:
            continue
        value = key(r) if callable(key) else r.get(key)
        if value is not None:
            steps.append(r["step"])
            values.append(value * scale)
    return steps, values


def _wait_share(r: dict) -> float | None:
    return r["data_wait_seconds"] / r["window_seconds"] if r.get("window_seconds") else None


def _pool(key: str):
    return lambda r: (r.get("teacher_pool") or {}).get(key)


class Run:
    def __init__(self, run_dir: str):
        self.dir, self.name = run_dir, storage.basename(run_dir)
        self.records = read_metrics(run_dir)
        if not any(r["kind"] == "train" for r in self.records):
            raise UserError("report", f"{run_dir} has no training records in metrics.jsonl yet; report a run once it has "
                            "logged a step (train.log_every)")
        trains = [r for r in self.records if r["kind"] == "train"]
        self.unit = trains[-1].get("unit", "samples")
        self.lm = any("eval_perplexity" in r for r in self.records)
        self.onpolicy = any("eval_reverse_kl" in r for r in self.records)
        self.teacher = next((r for r in reversed(self.records) if r["kind"] == "teacher"), None)
        self.pool = any(r.get("teacher_pool") for r in trains)


def _eval_panel(ax, run: Run, color, label: str) -> None:
    if run.onpolicy:  # what on-policy distillation lowers: the student's divergence on its own samples
        ax.plot(*series(run.records, "eval", "eval_reverse_kl"), "o-", color=color, label=f"{label}reverse KL")
        ax.plot(*series(run.records, "eval", "eval_sampled_kl"), "s--", color=color, label=f"{label}reverse KL (sampled)")
        ax.set_ylabel("KL(student || teacher) per token on its own samples of held-out prompts (lower is better)")
        return
    key, name = ("eval_perplexity", "perplexity") if run.lm else ("eval_accuracy", "accuracy")
    ax.plot(*series(run.records, "eval", key), "o-", color=color, label=f"{label}student")
    teacher = run.teacher and run.teacher.get(name)
    if teacher is not None:
        ax.axhline(teacher, color=color, linestyle="--", linewidth=1, label=f"{label}teacher ({teacher:.4g})")
    ax.set_ylabel(f"{name} on the eval split" + (" (lower is better)" if run.lm else ""))
    if run.lm:
        ax.set_yscale("log")


def _pool_panel(ax, run: Run, color, label: str, detail: bool) -> None:
    if not run.pool:
        if detail:
            ax.text(0.5, 0.5, "no teacher pool\n(no teacher, or its outputs read from a cache)", ha="center", va="center",
                    transform=ax.transAxes)
        return
    working = [r for r in run.records if not (r.get("teacher_pool") or {}).get("done")]
    ax.plot(*series(working, "train", _pool("busy_fraction"), 100), ".-", color=color, label=f"{label}busy")
    done = next((r["step"] for r in run.records if (r.get("teacher_pool") or {}).get("done")), None)
    if done is not None:  # its whole stream sent: from here the student reads what it queued
        ax.axvspan(done, max(r["step"] for r in run.records), color=color, alpha=0.08, label=f"{label}stream all sent")
    ax.set_ylabel("teacher actors' busy share (% of window)")
    ax.set_ylim(-5, 105)
    if detail:
        twin = ax.twinx()
        twin.step(*series(run.records, "train", _pool("actors")), where="post", color="tab:gray", label="actors working")
        twin.set_ylabel("actors working in the window")
        twin.yaxis.get_major_locator().set_params(integer=True)
        twin.legend(loc="center right", fontsize="small")


def _loss_panel(ax, run: Run, color, label: str, detail: bool) -> None:
    """One run: the loss and its terms. Several: each run's CE on the labels, the one term every
    run has (a distilled run's loss mixes in its KD term), and a distilled run's loss dashed."""
    kd = any(r.get("kd_loss") is not None for r in run.records)
    if detail:
        ax.plot(*series(run.records, "train", "loss"), color=color, label="loss")
        if kd:
            ax.plot(*series(run.records, "train", "kd_loss"), "--", color="tab:orange", label="KD term")
            ax.plot(*series(run.records, "train", "ce_loss"), ":", color="tab:green", label="CE term (labels)")
        return
    ax.plot(*series(run.records, "train", "ce_loss"), color=color, label=f"{label}CE term (labels)")
    if kd:
        ax.plot(*series(run.records, "train", "loss"), "--", color=color, linewidth=1, label=f"{label}loss (KD + CE)")


def _panels(axes, runs: list[Run], colors) -> None:
    detail = len(runs) == 1
    unit = runs[0].unit
    for run, color in zip(runs, colors):
        label = "" if detail else f"{run.name}: "
        _loss_panel(axes[0], run, color, label, detail)
        _eval_panel(axes[1], run, color, label)
        axes[2].plot(*series(run.records, "train", "samples_per_second"), ".-", color=color, label=f"{run.name}")
        axes[3].plot(*series(run.records, "train", _wait_share, 100), ".-", color=color, label=f"{run.name}")
        _pool_panel(axes[4], run, color, label, detail)
        axes[5].plot(*series(run.records, "train", "lr"), color=color, label=f"{run.name}")
        for step, what in restarts(run.records):
            for ax in axes:
                ax.axvline(step, color=color, linestyle=":", linewidth=1)
            axes[0].annotate(what, (step, 1), xycoords=("data", "axes fraction"), rotation=90, va="top", ha="right",
                             fontsize="small", color=color)
    titles = ["training loss (mean over each log window)", "evaluation", "throughput", "data wait",
              "teacher pool", "learning rate"]
    ylabels = [f"loss per {unit[:-1]}", None, f"{unit} / s", "waiting for batches (% of window)", None, "learning rate"]
    for ax, title, ylabel in zip(axes, titles, ylabels):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        if ylabel:
            ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0] and (not detail or ax in (axes[0], axes[1], axes[4])):
            ax.legend(fontsize="small", loc="upper right" if ax is axes[4] else "best")


def _headline(run: Run) -> str:
    """The run's name and how it ended, from its summary.json when it has one."""
    summary = read_summary(run.dir)
    if not summary.get("student"):
        return f"run {run.name} (in progress)"
    student, teacher = summary["student"], summary.get("teacher") or {}
    name = (summary.get("scores_shown") or DEFAULT_SCORES)[0][0]  # the task's first score is its headline
    score = f"student {name} {student[name]:.4g}" + (f", teacher {teacher[name]:.4g}" if teacher.get(name) is not None else "")
    return f"run {run.name}: {summary['status']}, {summary['steps']} steps, {score}"


def draw(run_dirs: list[str], out: str | None = None) -> str:
    """One run's picture (RUN_DIR/report.png) or several runs compared (`out`); returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [Run(d) for d in run_dirs]
    if out is None:
        out = storage.join(run_dirs[0], REPORT) if len(runs) == 1 else \
            os.path.join(os.path.dirname(os.path.normpath(run_dirs[0])), "compare_" + "_vs_".join(r.name for r in runs) + ".png")
    fig, grid = plt.subplots(2, 3, figsize=(18, 9.5), layout="constrained")
    colors = ["tab:blue"] if len(runs) == 1 else [f"C{i}" for i in range(len(runs))]
    _panels(list(grid.flat), runs, colors)
    fig.suptitle("\n".join(_headline(r) for r in runs), fontsize="large")
    picture = io.BytesIO()  # one write, to a directory or a bucket alike
    fig.savefig(picture, format="png", dpi=80)
    plt.close(fig)
    storage.write_bytes(out, picture.getvalue())
    return storage.shown(out)
