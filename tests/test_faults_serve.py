"""Serving under faults: tasks added while the bank is called, many tasks added, half-open connections
against a server with few file descriptors, and requests the service must refuse cleanly."""

import threading
import time

import pytest
import torch
from families import inputs_for
from test_bank import alone, make_base, task_model

import bitfit
from bitfit.artifacts import read_artifact
from bitfit.serving.bank import BiasBank


# ------------------------------------------------------------------------------ the bank
def test_add_task_while_other_threads_call_the_bank(tmp_path):
    """Adding tasks (folders and models in memory) while another thread calls the bank in a loop: no false
    refusal, and every added task answers as its own model does."""
    base = make_base("bert")
    a, b = task_model(base, 2, 1), task_model(base, 3, 2)
    bank = BiasBank(base, {"a": a, "b": b})
    enc = inputs_for("bert", batch=4)
    want_ab = bank(tasks=["a", "b", "a", "b"], **enc).logits
    new = {f"n{i}": task_model(base, 2 + i % 2, 10 + i) for i in range(8)}
    folders = {n: bitfit.save(m, tmp_path / n) for i, (n, m) in enumerate(new.items()) if i % 2}
    stop, errors, calls = threading.Event(), [], [0]

    def caller():
        deadline = time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                out = bank(tasks=["a", "b", "a", "b"], **enc)
                for got, want in zip(out.logits, want_ab):
                    assert torch.equal(got, want)
                calls[0] += 1
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return

    th = threading.Thread(target=caller, daemon=True)
    th.start()
    refused = []
    try:
        while calls[0] == 0 and th.is_alive():  # a call is running when the adds start
            time.sleep(0.001)
        for name, model in new.items():
            try:
                bank.add_task(name, folders.get(name, model))
            except Exception as exc:  # noqa: BLE001 - counted
                refused.append(f"{name}: {exc}")
    finally:
        stop.set()
        th.join(timeout=60)
    assert refused == []
    assert errors == []
    assert calls[0] > 0
    names = list(new)
    out = bank(tasks=names, **inputs_for("bert", batch=len(names)))
    for i, name in enumerate(names):
        ref = alone(new[name], inputs_for("bert", batch=len(names)))[i]
        torch.testing.assert_close(out.logits[i], ref, rtol=1e-6, atol=1e-6)


def test_adding_many_tasks_packs_the_tables_once(tmp_path):
    """Adding tasks copies no table per task: the tables are packed once, before the next call, and the base's
    fingerprint is computed once for the bank."""
    base = make_base("bert")
    models = [task_model(base, 2, 1), task_model(base, 3, 2)]
    arts = [read_artifact(bitfit.save(m, tmp_path / f"t{i}")) for i, m in enumerate(models)]
    bank = BiasBank(base)
    n = 300
    for i in range(n):
        bank.add_task(f"t{i}", arts[i % 2])
    assert bank.upkeep == {"repacks": 0, "fingerprints": 1}
    enc = inputs_for("bert", batch=4)
    out = bank(tasks=["t0", "t1", "t298", "t299"], **enc)
    assert bank.upkeep == {"repacks": 1, "fingerprints": 1}
    for i, k in enumerate((0, 1, 0, 1)):
        torch.testing.assert_close(out.logits[i], alone(models[k], enc)[i], rtol=1e-6, atol=1e-6)
    bank(tasks=["t5", "t6"], **inputs_for("bert", batch=2))
    assert bank.upkeep["repacks"] == 1  # nothing changed: no re-pack
    for i in range(0, n, 3):
        bank.remove_task(f"t{i}")
    bank.add_task("again", arts[1])
    out = bank(tasks=["again", "t1"], **inputs_for("bert", batch=2))
    assert bank.upkeep == {"repacks": 2, "fingerprints": 1}
    ref = alone(models[1], inputs_for("bert", batch=2))
    torch.testing.assert_close(out.padded(), ref, rtol=1e-6, atol=1e-6)
    assert all(len(t.owners) == t.values.shape[0] for t in bank._tables.values())
