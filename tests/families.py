"""Tiny random models of every supported family, built from configs."""
import transformers as T
H=dict(hidden_size=16,num_hidden_layers=2,num_attention_heads=2,intermediate_size=32,vocab_size=50,max_position_embeddings=64)
FAM = {
 "bert": (T.BertConfig(**H), T.BertForSequenceClassification),
 "roberta": (T.RobertaConfig(**H), T.RobertaForSequenceClassification),
 "distilbert": (T.DistilBertConfig(dim=16,n_layers=2,n_heads=2,hidden_dim=32,vocab_size=50,max_position_embeddings=64), T.DistilBertForSequenceClassification),
 "electra": (T.ElectraConfig(embedding_size=8,**H), T.ElectraForSequenceClassification),
 "mpnet": (T.MPNetConfig(**H), T.MPNetForSequenceClassification),
 "gpt2": (T.GPT2Config(n_embd=16,n_layer=2,n_head=2,vocab_size=50,n_positions=64,bos_token_id=0,eos_token_id=0,pad_token_id=0), T.GPT2ForSequenceClassification),
 "bloom": (T.BloomConfig(hidden_size=16,n_layer=2,n_head=2,vocab_size=50,pad_token_id=0), T.BloomForSequenceClassification),
 "opt": (T.OPTConfig(hidden_size=16,num_hidden_layers=2,num_attention_heads=2,ffn_dim=32,vocab_size=50,max_position_embeddings=64,word_embed_proj_dim=16,pad_token_id=0), T.OPTForSequenceClassification),
 "qwen2": (T.Qwen2Config(hidden_size=16,num_hidden_layers=2,num_attention_heads=2,num_key_value_heads=1,intermediate_size=32,vocab_size=50,pad_token_id=0), T.Qwen2ForSequenceClassification),
 "llama": (T.LlamaConfig(hidden_size=16,num_hidden_layers=2,num_attention_heads=2,num_key_value_heads=1,intermediate_size=32,vocab_size=50), T.LlamaForCausalLM),
 "t5": (T.T5Config(d_model=16,d_ff=32,num_layers=2,num_heads=2,d_kv=8,vocab_size=50), T.T5ForConditionalGeneration),
 "bart": (T.BartConfig(d_model=16,encoder_layers=2,decoder_layers=2,encoder_attention_heads=2,decoder_attention_heads=2,encoder_ffn_dim=32,decoder_ffn_dim=32,vocab_size=50,max_position_embeddings=64), T.BartForSequenceClassification),
 "vit": (T.ViTConfig(hidden_size=16,num_hidden_layers=2,num_attention_heads=2,intermediate_size=32,image_size=8,patch_size=4), T.ViTForImageClassification),
}


def make(family: str, seed: int = 0, pretrained_pooler: bool = True, **overrides):
    """A tiny randomly initialised model of ``family`` (eval mode, float32). ``pretrained_pooler=False`` leaves
    a BERT pooler as a fresh init leaves it (all-zero bias), like sentence-transformers checkpoints ship it."""
    import torch

    import copy

    config, cls = FAM[family]
    # a fresh config per model: merge() sets switches such as attention_bias on the model's config
    config = config.__class__(**{**config.to_dict(), **overrides}) if overrides else copy.deepcopy(config)
    torch.manual_seed(seed)
    model = cls(config)
    pooler = getattr(getattr(model, model.base_model_prefix, None), "pooler", None)
    if pooler is not None and pretrained_pooler:
        with torch.no_grad():  # as in a pretrained checkpoint (bert-base's NSP pooler); an all-zero bias would mark
            pooler.dense.bias.normal_(0.0, 0.02)  # it untrained, and BitFit would train it with the head
    model.eval()
    return model


def inputs_for(family: str, batch: int = 3, seq: int = 7, seed: int = 1):
    import torch

    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        return {"pixel_values": torch.randn(batch, 3, 8, 8, generator=g)}
    ids = torch.randint(3, 50, (batch, seq), generator=g)
    if family == "bart":
        ids[:, -1] = 2  # BART's classification head reads the last <eos>
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if family == "t5":
        out["decoder_input_ids"] = torch.randint(3, 50, (batch, 4), generator=g)
    return out


def logits_of(model, family: str, batch: int = 3, seq: int = 7):
    import torch

    with torch.no_grad():
        return model(**inputs_for(family, batch, seq)).logits


def train_steps(model, family: str = "bert", steps: int = 3, lr: float = 1e-2, weight_decay: float = 0.1):
    """A few AdamW steps on a fixed classification batch; returns the optimizer."""
    import torch

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    batch = inputs_for(family, batch=4)
    labels = torch.tensor([0, 1, 1, 0])
    for _ in range(steps):
        model(**batch, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return opt


def save_tiny_bert(folder, tokenizer_dir: str, seed: int = 0, **overrides):
    """A tiny random ``BertModel`` (real vocabulary size, so a real tokenizer fits) saved to ``folder`` with the
    tokenizer of ``tokenizer_dir``: a model folder `bitfit train` / `compare` load like a pretrained one."""
    import torch

    cfg = dict(vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
               max_position_embeddings=32)
    torch.manual_seed(seed)
    T.BertModel(T.BertConfig(**{**cfg, **overrides})).save_pretrained(folder)
    T.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder
