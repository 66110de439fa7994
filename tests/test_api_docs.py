"""The documentation site builds with warnings as errors: every page of docs/ and the API reference
that mkdocstrings generates from the docstrings (mkdocs.yml, docs/api.md).

A docstring that mkdocstrings cannot parse, a `::: name` that no longer resolves after code moves,
a page missing from the nav or a broken link between pages fails this test with mkdocs' own message.
"""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (it is in the dev extra: pip install -e '.[dev]')")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(REPO / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    page = (tmp_path / "site" / "api" / "index.html").read_text("utf8")
    for name in ("bitfit.apply", "BitFitConfig", "bitfit.report", "bitfit.artifacts.save", "BiasBank", "bitfit.peft"):
        assert name in page, f"{name!r} missing from the generated API page"
    # one rendered docstring body per `::: name` of docs/api.md (and more for their members)
    directives = sum(line.startswith(":::") for line in (REPO / "docs" / "api.md").read_text("utf8").splitlines())
    assert page.count('class="doc doc-contents') >= directives
