"""docs/TRAINING.md's table of BitFit defaults states the values the code sets: one source of truth.

The numbers in the table (learning rates, the head's factor, the epoch rule, dropout, batch size) are
read from the code's constants here, so a changed default cannot leave the docs stale."""

import re
from pathlib import Path

from bitfit.training import defaults as D

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _defaults_table() -> dict:
    text = (DOCS / "TRAINING.md").read_text()
    table = text[text.index("### BitFit defaults"):]
    table = table[: table.index("\n\n", table.index("|---"))]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and not cells[0].startswith("---"):
            rows[cells[0]] = cells[1]
    return rows


def _g(x: float) -> str:
    """2e-3, 5e-3: the notation the docs use for learning rates."""
    mantissa, exp = f"{x:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"


def test_training_defaults_table_matches_the_code():
    rows = _defaults_table()
    assert rows["`--learning_rate`"] == f"`{_g(D.BITFIT_LR)}` (`{_g(D.INSTRUCT_LR)}` for `--task instruct`)"
    assert rows["head learning rate"] == f"`{_g(D.BITFIT_LR * D.HEAD_LR_FACTOR)}` ({D.HEAD_LR_FACTOR:g} x lr)"
    assert rows["`--num_train_epochs`"] == (
        f"auto: enough for ~{D.TARGET_UPDATES} optimizer steps, between {D.MIN_EPOCHS} and {D.MAX_EPOCHS}")
    assert rows["`--dropout`"] == f"`{D.BITFIT_DROPOUT:g}`"
    assert rows["`--per_device_train_batch_size`"] == f"`{D.training_defaults()['per_device_train_batch_size']}`"


def test_the_head_factor_is_stated_the_same_everywhere():
    """Every page that states the head's factor states the code's (2.5x, not an older 5x)."""
    factor = f"{D.HEAD_LR_FACTOR:g}"
    for page in [*DOCS.glob("*.md"), DOCS.parent / "README.md"]:
        for m in re.finditer(r"head[^.\n]{0,60}?\b(\d+(?:\.\d+)?) ?x (?:the )?(?:--learning_rate|lr|learning rate|the biases)",
                             page.read_text()):
            assert m.group(1) == factor, f"{page.name}: {m.group(0)!r} (the code's factor is {factor})"
