"""Causal-LM instruction tuning: the Alpaca template, loss masking (exact), the collator, and a BitFit run
on a bias-free LLaMA-style model (add_missing switched on automatically), then `bitfit generate`."""

import json
import re

import pytest
import torch

import bitfit
from bitfit.cli import main
from bitfit.data.instruct import IGNORE, InstructionCollator, encode_example, format_prompt, load_instructions
from bitfit.errors import DataError

EXAMPLES = [
    {"instruction": "Name a colour", "input": "", "output": "red"},
    {"instruction": "Repeat the word", "input": "blue", "output": "blue blue"},
    {"instruction": "Say hello", "output": "hello there friend"},
    {"instruction": "Count to three", "input": "", "output": "one two three"},
]


pytestmark = pytest.mark.usefixtures("one_thread")



def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = set()
    for text in [format_prompt("x", "y"), format_prompt("x")] + [" ".join(e.values()) for e in EXAMPLES]:
        words.update(re.findall(r"\w+|[^\w\s]+", text))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in sorted(words):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    import transformers as T

    path = tmp_path_factory.mktemp("llama")
    tok = make_tokenizer()
    cfg = T.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                        bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    T.LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_prompt_template():
    with_input = format_prompt("Translate", "chat")
    assert with_input.startswith("Below is an instruction that describes a task, paired with an input")
    assert with_input.endswith("### Instruction:\nTranslate\n\n### Input:\nchat\n\n### Response:\n")
    assert format_prompt("Translate", "  ").endswith("### Instruction:\nTranslate\n\n### Response:\n")
    assert "### Input" not in format_prompt("Translate")


def test_loss_mask_is_exact():
    tok = make_tokenizer()
    ex = encode_example(tok, EXAMPLES[1], max_length=512)
    prompt_ids = tok(format_prompt("Repeat the word", "blue"))["input_ids"]
    n = len(prompt_ids)
    assert prompt_ids[0] == tok.bos_token_id and tok.convert_ids_to_tokens(prompt_ids[-3:]) == ["###", "Response", ":"]
    assert tok.unk_token_id not in prompt_ids
    assert ex["input_ids"][:n] == prompt_ids
    assert ex["labels"][:n] == [IGNORE] * n  # every prompt token masked ...
    response = ex["labels"][n:]
    assert response == ex["input_ids"][n:]  # ... and every response token (plus eos) is a target
    assert tok.convert_ids_to_tokens(response) == ["blue", "blue", "</s>"]
    assert ex["attention_mask"] == [1] * len(ex["input_ids"])
    short = encode_example(tok, EXAMPLES[1], max_length=n + 1)  # truncation cuts the response's end
    assert short["labels"] == [IGNORE] * n + [response[0]] and len(short["input_ids"]) == n + 1


def test_collator_pads_right_with_ignore():
    feats = [{"input_ids": [1, 5, 6], "attention_mask": [1, 1, 1], "labels": [IGNORE, 6, 2]},
             {"input_ids": [1, 7], "attention_mask": [1, 1], "labels": [IGNORE, 2]}]

    class Tok:
        pad_token_id, eos_token_id = None, 2

    batch = InstructionCollator(Tok())(feats)
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 2]]  # no pad token: eos pads
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 2], [IGNORE, 2, IGNORE]]


def test_model_loss_covers_only_response_tokens(llama_dir):
    import transformers as T

    tok = T.AutoTokenizer.from_pretrained(llama_dir)
    model = T.AutoModelForCausalLM.from_pretrained(llama_dir)
    batch = InstructionCollator(tok)([encode_example(tok, e, 256) for e in EXAMPLES[:2]])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shift_logits, shift_labels = logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1)
    keep = shift_labels != IGNORE
    assert keep.sum() == (1 + 1) + (2 + 1)  # "red"+eos, "blue blue"+eos
    manual = torch.nn.functional.cross_entropy(shift_logits[keep], shift_labels[keep])
    assert torch.allclose(model(**batch).loss, manual, atol=1e-6)


def test_instruction_file_errors(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"prompt": "x", "output": "y"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl has no 'instruction' column"):
        load_instructions(str(p))
    p.write_text(json.dumps({"instruction": "", "output": "y"}) + "\n")
    with pytest.raises(DataError, match=r"row 1: 'instruction' must be a non-empty string"):
        load_instructions(str(p))


def test_bitfit_instruction_tuning_on_bias_free_llama(llama_dir, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES * 4))
    out = tmp_path / "chat"
    assert main(["train", "--model", llama_dir, "--task", "instruct", "--train-file", str(data),
                 "--validation-file", str(data), "--output-dir", str(out), "--num_train_epochs", "10",
                 "--learning_rate", "1e-1", "--per_device_train_batch_size", "4", "--logging_steps", "4",
                 "--disable_tqdm", "true"]) == 0
    assert "adding zero-initialised biases" in capsys.readouterr().err  # add_missing switched on by itself
    metrics = json.loads((out / "metrics.json").read_text())
    losses = [e["loss"] for e in json.loads((out / "log_history.json").read_text()) if "loss" in e]
    assert losses[-1] < 0.9 * losses[0]  # bias-only on a random tiny LM: it learns the response vocabulary
    assert metrics["eval_perplexity"] == pytest.approx(torch.tensor(metrics["eval_loss"]).exp().item(), rel=1e-5)
    cfg = json.loads((out / "bitfit_config.json").read_text())
    assert cfg["bitfit_config"]["add_missing"] is True
    import transformers as T

    model = bitfit.load(T.AutoModelForCausalLM.from_pretrained(llama_dir), out)
    assert bitfit.get_state(model).added  # the added biases came back
    capsys.readouterr()
    assert main(["generate", "--adapter", str(out), "--prompt", "Name a colour", "--max-new-tokens", "3"]) == 0
    printed = capsys.readouterr().out
    tok = T.AutoTokenizer.from_pretrained(llama_dir)
    enc = tok(format_prompt("Name a colour"), return_tensors="pt")
    with torch.no_grad():
        ids = model.eval().generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert ids.shape[1] > enc["input_ids"].shape[1]
    assert printed == tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True) + "\n"
