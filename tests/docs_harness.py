"""Run the code blocks of README.md and docs/*.md (used by tests/test_docs.py).

Blocks are found with markdown-it-py, the CommonMark parser (the one pytest-markdown-docs builds
on); no hand-written fence parsing. A fence's language says how it runs:

* ``python``: executed in one namespace per file, in order (later blocks see earlier names);
* ``bash``: run with ``bash -euo pipefail`` in the same working folder, in order;
* ``text``: output or messages, not code (never run).

A block that cannot run in the tests carries an HTML comment on the line(s) just above it::

    <!-- skip: needs the Hub -->

and the reason is required (tests/test_docs.py checks it).

Small settings. The docs show real commands (``--data-dir ../shared/data/glue``, default epochs);
the tests run them unchanged, but

* in a scratch "repository" folder whose ``../shared/data/glue`` (and ``$BITFIT_GLUE_DIR``) is a
  small copy of the real GLUE files (64 training rows, 32 dev and test rows per task), so every
  GLUE command, ``--train-size 2000`` included, trains on 64 rows;
* with ``BITFIT_DOCS_SMALL=1`` and a ``bitfit`` on ``PATH`` that shortens training:
  ``bitfit train`` gets ``--num_train_epochs 1`` appended (the last flag wins), ``bitfit compare``
  one seed (``--seeds 1``), each method's default learning rate (``--lr-grid`` dropped) and
  ``--num_train_epochs 1``. Every other command runs exactly as written.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

from markdown_it import MarkdownIt

REPO = Path(__file__).resolve().parents[1]
RUN_LANGS = {"python", "bash"}
TEXT_LANGS = {"text"}
SKIP_RE = re.compile(r"<!--\s*skip:(?P<reason>.*?)-->", re.S)

SMALL_TRAIN, SMALL_DEV, SMALL_TEST = 64, 32, 32


@dataclasses.dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip: Optional[str]  # None: runs; else the reason given in <!-- skip: ... -->

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def doc_files() -> list[Path]:
    return [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))


def blocks(path: Path) -> list[Block]:
    """Every fenced block of a Markdown file, in order, with its skip reason (if any)."""
    tokens = MarkdownIt("commonmark").parse(path.read_text("utf8"))
    out: list[Block] = []
    for i, tok in enumerate(tokens):
        if tok.type != "fence":
            continue
        lang = tok.info.split()[0] if tok.info.strip() else ""
        skip = None
        prev = tokens[i - 1] if i else None
        # the skip comment must be the block right above the fence (blank lines between are fine)
        if prev is not None and prev.type == "html_block" and SKIP_RE.search(prev.content):
            skip = SKIP_RE.search(prev.content).group("reason").strip()
        out.append(Block(path, tok.map[0] + 1, lang, tok.content, skip))
    return out


def stray_skip_comments(path: Path) -> list[str]:
    """Skip comments that are not directly above a fence (they would silently skip nothing)."""
    tokens = MarkdownIt("commonmark").parse(path.read_text("utf8"))
    bad = []
    for i, tok in enumerate(tokens):
        if tok.type == "html_block" and SKIP_RE.search(tok.content):
            nxt = tokens[i + 1] if i + 1 < len(tokens) else None
            if nxt is None or nxt.type != "fence":
                bad.append(f"{path.relative_to(REPO)}:{tok.map[0] + 1}")
    return bad


# --- the small world the blocks run in ---------------------------------------------------------

def make_small_glue(real: Path, dest: Path) -> Path:
    """A copy of the GLUE folder with the first rows of every file (header kept)."""
    for task_dir in sorted(p for p in real.iterdir() if p.is_dir()):
        out = dest / task_dir.name
        out.mkdir(parents=True, exist_ok=True)
        for f in task_dir.iterdir():
            if not f.is_file():
                continue
            n = SMALL_TRAIN if "train" in f.name else SMALL_DEV if "dev" in f.name else SMALL_TEST
            with open(f, "rb") as src, open(out / f.name, "wb") as dst:
                for k, line in enumerate(src):
                    if k > n:  # header + n rows (CoLA has no header: n + 1 rows)
                        break
                    dst.write(line)
    return dest


SHIM = '''#!{python}
"""bitfit with the docs tests' small settings (tests/docs_harness.py)."""
import sys

argv = sys.argv[1:]
if argv[:1] == ["train"]:
    argv += ["--num_train_epochs", "1"]
elif argv[:1] == ["compare"]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--lr-grid", "--lr_grid", "--seeds"):
            skip = True
            continue
        if a.startswith(("--lr-grid=", "--lr_grid=", "--seeds=")):
            continue
        out.append(a)
    argv = out + ["--seeds", "1", "--num_train_epochs", "1"]
from bitfit.cli import main

sys.exit(main(argv))
'''


@dataclasses.dataclass
class World:
    """A scratch repository folder (cwd of the blocks) with ../shared/data/glue beside it."""

    root: Path
    work: Path
    glue: Path
    bin: Path

    def env(self) -> dict:
        env = dict(os.environ)
        env.update(
            BITFIT_DOCS_SMALL="1",
            BITFIT_GLUE_DIR=str(self.glue),
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            TRANSFORMERS_VERBOSITY="error",
            OMP_NUM_THREADS="1",
            PATH=os.pathsep.join([str(self.bin), str(Path(sys.executable).parent), env.get("PATH", "")]),
        )
        return env


def make_world(tmp: Path, real_glue: Path) -> World:
    work = tmp / "repo"
    work.mkdir(parents=True)
    glue = make_small_glue(real_glue, tmp / "shared" / "data" / "glue")
    binp = tmp / "bin"
    binp.mkdir()
    shim = binp / "bitfit"
    shim.write_text(SHIM.format(python=sys.executable))
    shim.chmod(0o755)
    for name in ("benchmarks", "scripts"):  # commands that name repository files find them
        if (REPO / name).exists():
            (work / name).symlink_to(REPO / name)
    return World(tmp, work, glue, binp)


# --- running ---------------------------------------------------------------------------------

class BlockFailed(AssertionError):
    pass


def run_bash(block: Block, world: World, timeout: float = 2400) -> str:
    """Run a bash block; on failure or timeout (wall time: generous, the machine may be shared) the
    whole process group is ended and the error shows the block and the end of its output."""
    proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", block.code], cwd=world.work, env=world.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise BlockFailed(f"{block.where}: bash block still running after {timeout:.0f} s\n--- block ---\n"
                          f"{block.code}--- output (last 4000 characters) ---\n{out[-4000:]}")
    if proc.returncode != 0:
        raise BlockFailed(f"{block.where}: bash block exited {proc.returncode}\n--- block ---\n{block.code}"
                          f"--- output (last 4000 characters) ---\n{out[-4000:]}")
    return out


def run_python(block: Block, namespace: dict) -> None:
    code = compile(block.code, block.where, "exec")
    try:
        exec(code, namespace)
    except Exception as exc:
        raise BlockFailed(f"{block.where}: python block raised {type(exc).__name__}: {exc}\n--- block ---\n"
                          f"{block.code}") from exc


def run_file(path: Path, world: World) -> tuple[int, int]:
    """Run every runnable block of ``path`` in order; returns (run, skipped). Call with cwd = world.work
    and the world's environment in os.environ (the python blocks run in this process)."""
    namespace = {"__name__": "__main__"}
    ran = skipped = 0
    for block in blocks(path):
        if block.lang not in RUN_LANGS:
            continue
        if block.skip is not None:
            skipped += 1
            continue
        if block.lang == "bash":
            run_bash(block, world)
        else:
            run_python(block, namespace)
        ran += 1
    return ran, skipped
