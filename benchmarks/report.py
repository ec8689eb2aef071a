"""What the benchmark prints: the header, the table, the details under it and the JSON blob."""

from __future__ import annotations

import os
import sys

from workloads import MODES

KD_MODES = ("kd_student", "kd_student_parquet", "kd_ray", "kd_ray_parquet", "colocated", "cached")
TABLE_LABELS = {"student": "1 student only (torch)", "reference": "2 reference KD (torch)",
                "precomputed": "  plain KD, precomputed logits (torch)",
                "kd_step": "  kd_ray step fns, no Ray", "kd_student": "  kd_ray, student alone",
                "kd_student_parquet": "  kd_ray, student alone, parquet",
                "kd_ray": "3 kd_ray online", "kd_ray_parquet": "3 kd_ray online, parquet", "colocated": "3c kd_ray colocated",
                "cached": "4 kd_ray cached"}


def num(v) -> str:
    return "-" if v is None else f"{v:,.1f}"


def ratio(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def print_header(args, cfg: dict, host: dict, workdir: str) -> None:
    print(f"kd_ray throughput benchmark, preset {args.preset}: {cfg['device']}, {host['cpus']} CPUs "
          f"(torch.backends.cpu.get_cpu_capability() {host['cpu_capability']}), torch {host['torch']}, "
          f"ray {host['ray']}" + (f", {host['gpu']}" if host["gpu"] else "") + f"; load average {os.getloadavg()[0]:.2f}")
    print(f"workload: {cfg['image']} samples, {cfg['classes']} classes, {cfg['rows']} rows; teacher {cfg['teacher']}; student {cfg['student']}")
    print(f"          batch {cfg['batch_size']}, {cfg['precision']}, channels_last {cfg['channels_last']}, compile {cfg['compile']}; "
          f"warm-up {cfg['warmup']} steps, then {cfg['windows']} windows x {cfg['window_steps']} steps; T={cfg['temperature']} alpha={cfg['alpha']}")
    print(f"threads: modes 1-2 use torch.set_num_threads({cfg['threads']}) in one process; kd_ray runs its own processes "
          f"(online: train worker {args.kd_cpus_per_worker:g} CPU, teacher actor {args.kd_cpus_per_actor:g} CPU; cached and student alone: "
          f"train worker {args.kd_cpus_per_worker_alone:g} CPU; Ray sets their threads, probed below)")
    print(f"work dir: {workdir}", flush=True)


# ---------------------------------------------------------------------------------------------
# The table


def print_table(results: dict, cfg: dict) -> None:
    student = results.get("student", {}).get("samples_per_second")
    reference = results.get("reference", {}).get("samples_per_second")
    rows = [_table_row(key, results[key], student, reference, cfg["batch_size"]) for key in MODES if key in results]
    head = ("mode", "samples/s", "ms/step", "windows", "vs student", "vs reference", "peak RSS MB (per process)", "how")
    full = [r for r in rows if not (r[3] == "" and r[4] == "")]  # skipped rows span the line
    widths = [max(len(str(r[i])) for r in full + [head]) for i in range(len(head))]
    print()
    print("  ".join(str(h).ljust(w) for h, w in zip(head, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        if r[3] == "" and r[4] == "":
            print(f"{str(r[0]).ljust(widths[0])}  {r[1]}")
        else:
            print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    cached = vs_precomputed(results)
    if cached is not None:
        print(f"\n4 kd_ray cached against the plain loop over the same logits, precomputed: {ratio(cached)}")


# The ratios the issues set targets on: kd_ray's mode over its plain counterpart
ROUND_PAIRS = (("kd_student", "student"), ("kd_student_parquet", "student"), ("kd_ray", "reference"),
               ("kd_ray_parquet", "reference"), ("colocated", "reference"), ("colocated", "kd_ray"), ("cached", "precomputed"),
               ("cached", "student"))


def round_ratios(results: dict) -> dict:
    """With --rounds: each pair's ratio within every round (the two modes ran minutes apart, not a
    whole invocation), and their median."""
    out = {}
    for a, b in ROUND_PAIRS:
        ra, rb = (results.get(m, {}).get("rounds_samples_per_second") for m in (a, b))
        if ra and rb and len(ra) == len(rb):
            each = [x / y if x and y else None for x, y in zip(ra, rb)]
            known = sorted(v for v in each if v is not None)
            out[f"{a} / {b}"] = {"rounds": each, "median": known[(len(known) - 1) // 2] if known else None}
    return out


def whole_runs(results: dict) -> dict:
    """Each kd_ray mode's whole run, start-up included (summary.json's samples/s: every step, from the
    workers' start to the last step), against the reference's steady rate."""
    reference = results.get("reference", {}).get("samples_per_second")
    out = {}
    for key in KD_MODES:
        whole = (results.get(key, {}).get("summary_json") or {}).get("samples_per_second")
        if whole and reference:
            out[key] = {"samples_per_second": whole, "vs_reference": whole / reference}
    return out


def print_whole_runs(results: dict) -> None:
    runs = whole_runs(results)
    if runs:
        print("\nwhole runs (start-up included: summary.json's samples/s) against the reference's steady rate: "
              + ", ".join(f"{TABLE_LABELS[k].strip()} {num(r['samples_per_second'])} ({ratio(r['vs_reference'])})" for k, r in runs.items()))


def print_rounds(results: dict) -> None:
    ratios = round_ratios(results)
    if not ratios:
        return
    print("\nratios within each round (median, then every round):")
    for pair, r in ratios.items():
        print(f"  {pair:<32} {ratio(r['median'])}   " + ", ".join(ratio(v) for v in r["rounds"]))


def vs_precomputed(results: dict) -> float | None:
    """The cached mode's rate over the plain loop that trains from teacher logits computed
    beforehand: the same work, so the ratio is what kd_ray's run of a cache costs."""
    sps = results.get("cached", {}).get("samples_per_second")
    plain = results.get("precomputed", {}).get("samples_per_second")
    return sps / plain if sps and plain else None


def _table_row(key: str, r: dict, student, reference, batch: int) -> tuple:
    if "skipped" in r:
        return (TABLE_LABELS[key], r["skipped"], "", "", "", "", "", "")
    sps = r.get("samples_per_second")
    win = r.get("windows_samples_per_second") or []
    spread = f"{min(win):,.0f}-{max(win):,.0f}" if win else "-"
    if key in KD_MODES:
        peak, how = _kd_peak(r), _kd_how(r)
    else:
        peak = f"{r['peak_rss_mb']:,.0f}" if "peak_rss_mb" in r else "-"
        if "peak_cuda_allocated_mb" in r:
            peak += f" (cuda {r['peak_cuda_allocated_mb']:,.0f})"
        how = "median of windows" if sps else r.get("error", "")
    return (TABLE_LABELS[key], num(sps), f"{1e3 * batch / sps:.3f}" if sps else "-", spread, ratio(sps / student) if sps and student else "-",
            ratio(sps / reference) if sps and reference else "-", peak, how)


def _kd_peak(r: dict) -> str:
    mem = r.get("memory", {}).get("by_role", {})
    peak = f"driver {mem.get('driver (kd-ray CLI)', {}).get('max_peak_rss_mb', 0):,.0f}"
    for role, short in (("train worker", "worker"), ("teacher actor", "teacher")):
        if role in mem:
            peak += f" + {short} {mem[role]['max_peak_rss_mb']:,.0f}"
    return peak


def _kd_how(r: dict) -> str:
    how = r.get("measured_as", "")
    if r.get("not_steady"):
        return "teacher's 1st forward -> last step: windows NOT STEADY, see below"
    if r.get("bursty"):
        return "all windows together: bursty data, see below"
    return "median of windows" if how.startswith("median") else (how or r.get("error", ""))


# ---------------------------------------------------------------------------------------------
# The details under the table


def print_details(results: dict, cfg: dict) -> None:
    cost = results.get("reference", {}).get("cost")
    if cost:
        print(f"\nteacher/student forward cost: {cost['flops_ratio']:.1f}x FLOPs "
              f"({cost['teacher_flops_per_sample'] / 1e6:,.1f} vs {cost['student_flops_per_sample'] / 1e6:,.1f} MFLOP/sample), "
              f"{cost['timed_forward_ratio']:.1f}x timed eager forward "
              f"({cost['teacher_forward_ms']:.1f} vs {cost['student_forward_ms']:.1f} ms per batch of {cfg['batch_size']})")
    for key, label in (("kd_student", "student alone"), ("kd_student_parquet", "student alone, parquet"), ("kd_ray", "online"),
                       ("kd_ray_parquet", "online, parquet"), ("colocated", "colocated"), ("cached", "cached")):
        kd = results.get(key)
        if not kd or "skipped" in kd:
            continue
        print(f"\nkd_ray {label}: `{kd['command']}`")
        _print_kd_rates(kd)
        _print_kd_timeline(kd)
        _print_kd_processes(kd)
    _print_closing(results)


def _print_kd_rates(kd: dict) -> None:
    """The capture, summary.json's aggregate and the timed windows of one kd_ray mode."""
    s = kd.get("summary_json", {})
    capture = kd.get("capture")
    if capture:
        print(f"  capture, before the run: `{capture['command']}`: {num(capture.get('samples_per_second'))} samples/s "
              f"({capture.get('pool_seconds')} s from the pool's start to the last shard, {capture['wall_seconds']:.1f} s with Ray's "
              f"start), {capture.get('bytes_per_sample')} bytes/sample on disk")
    if s.get("samples_per_second") is not None:
        print(f"  summary.json aggregate (all {s.get('steps')} steps, start-up window and final eval/checkpoint included): "
              f"{s['samples_per_second']:,.1f} samples/s over {s.get('train_seconds')} s train, {s.get('wall_seconds')} s run")
    if not kd.get("windows"):
        return
    print(f"  windows after the {kd['warmup_steps']}-step warm-up (step: samples/s, share of time waiting for data):")
    print("    " + "; ".join(f"{w['end']}: {w['samples_per_second']:,.0f}, {100 * w['data_wait_fraction']:.0f}%" for w in kd["windows"]))
    if kd["windows"] and "teacher_busy_fraction" in kd["windows"][0]:
        print("    teacher actor busy in each window: " + ", ".join(
            f"{100 * w.get('teacher_busy_fraction', 0):.0f}% (queue {w.get('teacher_queue_at_start', 0):,})" for w in kd["windows"]))
    if kd.get("head_start_windows_dropped"):
        print(f"    the first {kd['head_start_windows_dropped']} drained the teacher's head start (no data wait, later windows wait): not in the median")
    print(f"  median {num(kd.get('windows_median_samples_per_second'))} samples/s; all windows together {num(kd.get('timed_aggregate_samples_per_second'))} samples/s; "
          f"student waited for data {100 * kd['data_wait_fraction']:.0f}% of the time (median window)")


def _print_kd_timeline(kd: dict) -> None:
    """What the teacher actor did (forward hooks) and when each stage began after the launch."""
    tl = kd.get("timeline")
    if tl:
        print(f"  teacher actor (forward hooks): {tl['teacher_samples']:,} samples in {tl['teacher_forwards']} forwards, "
              f"{num(tl['teacher_rate_busy'])} samples per busy second; it started {tl['teacher_first_forward_before_first_step_s']:.1f} s "
              f"before the student's first step and had {tl['teacher_rows_before_first_step']:,} samples ready by then")
        print(f"  data path from the teacher's first forward to the student's last step: {tl['pipeline_samples_per_second']:,.1f} samples/s")
    if kd.get("not_steady"):
        print(f"  NOT STEADY: {kd['not_steady']}")
    print(f"  process wall {kd['wall_seconds']:.1f} s; after launch: start line {num(kd.get('seconds_to_start_line'))} s"
          + (f", teacher's first training forward {tl['teacher_first_forward_s_after_launch']:.1f} s, student's first step "
             f"{tl['student_first_step_s_after_launch']:.1f} s, teacher's last forward {tl['teacher_last_forward_s_after_launch']:.1f} s" if tl else "")
          + f", first step report {num(kd.get('seconds_to_first_step_report'))} s")


def _print_kd_processes(kd: dict) -> None:
    """Cores and memory by process role, torch threads where the models were built, notes, errors."""
    cores = kd.get("cores_by_role_in_windows")
    if cores:
        print(f"  cores used in the timed windows (of {os.cpu_count()}), total {sum(cores.values()):.2f}: "
              + ", ".join(f"{role} {c:.2f}" for role, c in cores.items() if c >= 0.005))
    mem = kd.get("memory", {})
    if mem:
        print(f"  peak RSS by process role ({mem.get('processes_seen')} processes seen; RSS counts shared object-store pages in each):")
        for role, r in mem.get("by_role", {}).items():
            gpu = f", GPU {r['gpu_mb']:,.0f} MB" if r.get("gpu_mb") else ""
            print(f"    {role:<46} {r['processes']:>2} proc  max {r['max_peak_rss_mb']:>7,.0f} MB  sum {r['sum_peak_rss_mb']:>7,.0f} MB{gpu}")
        print(f"    whole tree at its largest: RSS sum {mem.get('max_simultaneous_tree_rss_mb', 0):,.0f} MB, "
              f"PSS sum {mem.get('max_simultaneous_tree_pss_mb', 0):,.0f} MB (shared pages counted once; sampled every 2 s)")
    probe = {(p["process"], p["role"], p["torch_threads"], p["OMP_NUM_THREADS"]) for p in kd.get("threads_probe", [])}
    if probe:
        print("  torch threads where the models were built: " + "; ".join(
            f"{role} in {proc}: {t} (OMP_NUM_THREADS={omp})" for proc, role, t, omp in sorted(probe)))
    for note in kd.get("notes", []):
        print(f"  note: {note}")
    if kd.get("error"):
        print(f"  ERROR {kd['error']}; last lines:\n" + "\n".join("    " + ln for ln in kd.get("log_tail", "").splitlines()))


def _print_closing(results: dict) -> None:
    """The host's drift over the run, the single-process modes' PSS and their errors."""
    drift = results.get("student", {}).get("drift")
    if drift is not None:
        print(f"\ndrift: mode 1 run again at the end gave {drift:.2f}x its first rate"
              + (" (more than 10% apart: the host's speed changed during the run, so read the ratios with that margin)" if abs(drift - 1) > 0.1 else ""))
    pss = [f"{k} {results[k]['pss_at_end_mb']:,.0f} MB" for k in ("student", "reference", "precomputed", "kd_step") if results.get(k, {}).get("pss_at_end_mb")]
    if pss:
        print(f"\nPSS of the single-process modes at their end (compare with kd_ray's tree PSS): {', '.join(pss)}")
    for key in ("student", "reference", "precomputed", "kd_step"):
        r = results.get(key)
        if r and r.get("error"):
            print(f"\n{key}: ERROR {r['error']}\n{r.get('log_tail', '')}")


# ---------------------------------------------------------------------------------------------
# JSON


def results_blob(argv: list[str] | None, host: dict, cfg: dict, args, results: dict, ladder_out, runtime: float) -> dict:
    """Everything measured, with each mode's rate as a ratio to the student alone and to the reference."""
    use_gpu = cfg["device"] == "cuda"
    blob = {"benchmark": "kd_ray throughput", "command": " ".join(["python", "benchmarks/throughput.py", *(argv if argv is not None else sys.argv[1:])]),
            "host": host, "workload": {k: v for k, v in cfg.items() if k not in ("train_npz", "models_dir", "teacher_weights")},
            "kd_ray_resources": {"cpus_per_worker": args.kd_cpus_per_worker, "cpus_per_worker_without_teacher": args.kd_cpus_per_worker_alone,
                                 "cpus_per_actor": args.kd_cpus_per_actor,
                                 "gpus_per_actor": args.kd_gpus_per_actor if use_gpu else 0,
                                 "gpus_per_worker": args.kd_gpus_per_worker if use_gpu else 0},
            "modes": results, "ladder": ladder_out, "runtime_seconds": runtime}
    student = results.get("student", {}).get("samples_per_second")
    reference = results.get("reference", {}).get("samples_per_second")
    for r in results.values():
        sps = r.get("samples_per_second")
        r["vs_student"] = sps / student if sps and student else None
        r["vs_reference"] = sps / reference if sps and reference else None
    if "cached" in results:
        results["cached"]["vs_precomputed"] = vs_precomputed(results)
    blob["round_ratios"] = round_ratios(results)
    blob["whole_runs"] = whole_runs(results)
    return blob
