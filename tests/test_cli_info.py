"""`bitfit info` on a local folder and the packaged MiniLM; clean errors."""

import json

import pytest
from families import make

from bitfit.cli import main


def test_info_json_on_local_folder(tmp_path, capsys):
    make("bert").save_pretrained(tmp_path / "m")
    assert main(["info", str(tmp_path / "m"), "--task-head", "3", "--preset", "paper-subset", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    H, I, L = 16, 32, 2
    assert d["by_role"]["query"]["trainable"] == L * H
    assert d["by_role"]["ffn_in"]["trainable"] == L * I
    assert d["head"] == H * 3 + 3
    assert d["trainable"] == L * (H + I) + H * 3 + 3


def test_info_packaged_minilm(capsys, minilm_dir):
    assert main(["info", "minilm"]) == 0
    out = capsys.readouterr().out
    assert "26,112 of 22,713,216" in out and "26,112 bias parameters" in out


@pytest.mark.parametrize(
    "argv,match",
    [
        (["info", "/nonexistent/model/dir"], "could not load model"),
        (["info", "minilm", "--preset", "bogus"], "unknown preset"),
    ],
)
def test_info_errors_are_clean(argv, match, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def test_unknown_command(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err
