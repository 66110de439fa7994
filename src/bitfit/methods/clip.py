"""Cross-modal BitFit on a CLIP-style dual encoder: zero-shot labels as the head.

A CLIP model (``transformers.CLIPModel``; any model whose forward takes ``input_ids`` and
``pixel_values`` and returns ``logits_per_image``) classifies an image by comparing its embedding
with the embeddings of one text prompt per class ("a photo of a {label}."). The class embeddings
come from the text tower, so there is no new head to train: BitFit trains the biases of both
towers (``bitfit.apply``), and the "head" is the model's temperature ``logit_scale`` (one number;
``train_head=False`` keeps it frozen). The projections into the shared space have no bias; they
stay frozen unless ``add_missing=True`` gives them zero ones (which ``bitfit.merge`` cannot fold
into a ``CLIPModel``: keep the artifact form then).

:class:`ZeroShotClassifier` wraps the model: ``forward(pixel_values, labels)`` returns the
image-vs-class-text logits and their cross-entropy loss, so a plain loop or a
``transformers.Trainer`` trains it. ``bitfit.save``/``load``/``merge`` take the wrapped model
(``clf.model``); :func:`set_label_names` puts the class names in its config, so the artifact
records them.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BitFitError

DEFAULT_TEMPLATE = "a photo of a {}."


def class_prompts(tokenizer, label_names: Sequence[str], template: str = DEFAULT_TEMPLATE) -> dict:
    """Tokenized prompts, one per class: ``template.format(name)`` for each label name."""
    if not label_names:
        raise BitFitError("class_prompts needs at least one label name")
    texts = [template.format(name) for name in label_names]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}


def set_label_names(model: nn.Module, label_names: Sequence[str]) -> None:
    """Record the class names in ``model.config`` (``id2label``/``label2id``): ``bitfit.save`` stores
    them and ``bitfit.load`` puts them back."""
    names = [str(n) for n in label_names]
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {n: i for i, n in enumerate(names)}


class ZeroShotClassifier(nn.Module):
    """``model`` (a CLIP-style dual encoder) as an image classifier over the classes of ``class_inputs``.

    ``class_inputs``: the tokenized class prompts (:func:`class_prompts`), ``input_ids`` and an
    optional ``attention_mask``, one row per class. ``label_names``, if given, are recorded in the
    model's config (:func:`set_label_names`).
    """

    def __init__(self, model: nn.Module, class_inputs: dict, label_names: Optional[Sequence[str]] = None):
        super().__init__()
        if "input_ids" not in class_inputs:
            raise BitFitError("class_inputs needs input_ids (the tokenized class prompts, one row per class)")
        self.model = model
        self.class_inputs = {k: torch.as_tensor(v) for k, v in class_inputs.items()}
        self.num_classes = int(self.class_inputs["input_ids"].shape[0])
        if label_names is not None:
            if len(label_names) != self.num_classes:
                raise BitFitError(f"{len(label_names)} label names for {self.num_classes} class prompts")
            set_label_names(model, label_names)

    def forward(self, pixel_values: torch.Tensor, labels: Optional[torch.Tensor] = None):
        from transformers.modeling_outputs import ImageClassifierOutput

        device = pixel_values.device
        texts = {k: v.to(device) for k, v in self.class_inputs.items()}
        logits = self.model(pixel_values=pixel_values, **texts).logits_per_image  # [images, classes]
        loss = F.cross_entropy(logits, labels.to(device)) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


__all__ = ["ZeroShotClassifier", "class_prompts", "set_label_names", "DEFAULT_TEMPLATE"]
