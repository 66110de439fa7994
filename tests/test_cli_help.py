"""Every subcommand's --help lists exactly the flags its parser accepts, --verbose (which `bitfit` takes off the
command line for any subcommand) included; --verbose goes anywhere on the line and stores nothing."""

import argparse
import re

import pytest

from bitfit.cli import COMMANDS, _load_plugins, main

_load_plugins()
SUBCOMMANDS = ["train", "eval", "predict", "generate", "compare", "analyze", "serve", "merge", "info", "export",
               "convert"]
INVOCATION = re.compile(r"^  (-\S.*?)(?:\s{2,}|$)")  # an option's line: "  -h, --help   text" (2-space indent)


def help_of(cmd, monkeypatch, capsys):
    """(help text, the parser that printed it)."""
    shown = []
    orig = argparse.ArgumentParser.format_help

    def format_help(self):
        shown.append(self)
        return orig(self)

    monkeypatch.setattr(argparse.ArgumentParser, "format_help", format_help)
    with pytest.raises(SystemExit) as exc:
        main([cmd, "--help"])
    assert exc.value.code == 0
    assert shown, f"bitfit {cmd} --help printed no parser's help"
    return capsys.readouterr().out, shown[-1]


def listed_flags(text: str) -> set:
    flags = set()
    for line in text.splitlines():
        m = INVOCATION.match(line)
        if m:
            for part in m.group(1).split(", "):
                flags.add(part.split(" ", 1)[0])
    return flags


def test_every_subcommand_is_covered():
    assert sorted(COMMANDS) == sorted(SUBCOMMANDS)


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_help_lists_exactly_the_accepted_flags(cmd, monkeypatch, capsys):
    text, parser = help_of(cmd, monkeypatch, capsys)
    accepted = {o for a in parser._actions for o in a.option_strings}
    hidden = {o for a in parser._actions if a.help == argparse.SUPPRESS for o in a.option_strings}
    assert not hidden, f"bitfit {cmd} accepts flags its --help hides: {sorted(hidden)}"
    assert "--verbose" in accepted and "--help" in accepted
    assert listed_flags(text) == accepted, (sorted(listed_flags(text) - accepted), sorted(accepted - listed_flags(text)))
    assert re.search(r"^  --verbose\s+show transformers' load reports", text, re.M)
    if cmd == "compare":  # the rest of its command line goes to every run's TrainingArguments, as it says
        assert "TrainingArguments" in text


def test_verbose_anywhere_and_stores_nothing(monkeypatch):
    from bitfit.cli import add_verbose

    p = add_verbose(argparse.ArgumentParser())
    p.add_argument("--x", default=1)
    monkeypatch.setenv("BITFIT_VERBOSE", "")  # restored (unset) after the test
    monkeypatch.delenv("BITFIT_VERBOSE")
    ns = p.parse_args(["--verbose", "--x", "2"])
    assert vars(ns) == {"x": "2"}  # nothing named verbose: HfArgumentParser would return an extra namespace
    import os

    assert os.environ["BITFIT_VERBOSE"] == "1"
    seen = []
    monkeypatch.setitem(COMMANDS, "probe", ("", lambda argv: seen.append(argv) or 0))
    monkeypatch.delenv("BITFIT_VERBOSE", raising=False)
    assert main(["probe", "a", "--verbose", "b"]) == 0 and seen[-1] == ["a", "b"]
    assert os.environ.get("BITFIT_VERBOSE") == "1"
    monkeypatch.delenv("BITFIT_VERBOSE", raising=False)
    assert main(["--verbose", "probe", "c"]) == 0 and seen[-1] == ["c"]
    assert os.environ.get("BITFIT_VERBOSE") == "1"


def test_train_parses_with_verbose_given_directly(tmp_path, monkeypatch):
    """The train parser (HfArgumentParser over the dataclasses) still returns its three results with --verbose."""
    from bitfit.cli.trainargs import parse_train_args

    monkeypatch.setenv("BITFIT_VERBOSE", "")
    train = tmp_path / "t.csv"
    train.write_text("text,label\na,x\nb,y\n")
    model_args, data_args, training_args = parse_train_args(
        ["--model", "m", "--train-file", str(train), "--output-dir", str(tmp_path / "o"), "--max_steps", "1",
         "--verbose", "--report_to", "none"])
    assert data_args.train_file == str(train) and training_args.max_steps == 1


def test_train_batches_random_for_classification_and_by_length_for_instructions(tmp_path):
    """`bitfit train` keeps random batches for classification and regression (their padding is trimmed in
    sub-batches, --length_sub_batches; length-grouped batches cost RTE 3 points, docs/RESULTS.md) and groups
    instruction rows by length; an explicit --train_sampling_strategy wins."""
    from bitfit.cli.trainargs import parse_train_args
    from bitfit.training.defaults import length_grouping

    train = tmp_path / "t.csv"
    train.write_text("text,label\na,x\nb,y\n")
    argv = ["--model", "m", "--train-file", str(train), "--output-dir", str(tmp_path / "o"), "--max_steps", "1"]
    (key, value), = length_grouping().items()
    model_args, _, training_args = parse_train_args(argv)
    assert getattr(training_args, key) != value and model_args.length_sub_batches is True
    assert parse_train_args(argv + ["--length_sub_batches", "false"])[0].length_sub_batches is False
    inst = tmp_path / "i.jsonl"
    inst.write_text('{"instruction": "say hi", "output": "hi"}\n')
    argv_i = ["--model", "m", "--task", "instruct", "--train-file", str(inst), "--output-dir", str(tmp_path / "i"),
              "--max_steps", "1"]
    assert getattr(parse_train_args(argv_i)[2], key) == value
    if key == "train_sampling_strategy":
        assert parse_train_args(argv_i + ["--train_sampling_strategy", "random"])[2].train_sampling_strategy == "random"
