"""BitFitPeftConfig: a peft ``PeftConfig`` whose fields are those of :class:`bitfit.BitFitConfig`."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import InitVar, dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from ..core.config import BitFitConfig
from ..errors import BitFitConfigError
from .convert import LEGACY_DEFAULTS, PEFT_CONFIG_NAME, PEFT_TYPE, SELECTION_FIELDS, check_header, read_peft_config


def ensure_peft_type() -> PeftType:
    """``PeftType.BITFIT``, added to peft's enum if this peft does not have it.

    peft's ``register_peft_method`` accepts only names of its ``PeftType`` enum; an enum cannot be
    extended by subclassing, so the member is added the way ``Enum`` itself stores members.
    """
    member = PeftType.__members__.get(PEFT_TYPE)
    if member is not None:
        return member
    member = str.__new__(PeftType, PEFT_TYPE)
    member._name_ = member._value_ = PEFT_TYPE
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[PEFT_TYPE] = member
    PeftType._value2member_map_[PEFT_TYPE] = member
    PeftType._member_names_.append(PEFT_TYPE)
    type.__setattr__(PeftType, PEFT_TYPE, member)
    return member


ensure_peft_type()

_HELP = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(BitFitConfig)}


def _field(default, name: str):
    return field(default=default, metadata={"help": _HELP.get(name, "")})


@dataclass
class BitFitPeftConfig(PeftConfig):
    """BitFit (train only the bias terms, and the task head) as a peft method.

    ``get_peft_model(model, BitFitPeftConfig(...))`` trains exactly what
    ``bitfit.apply(model, ...)`` with the same fields would: selection, added biases, lean
    layers and frozen dtype all come from :func:`bitfit.apply`. The head follows ``train_head``
    and trains in place (no ``ModulesToSaveWrapper`` copy); ``modules_to_save`` is accepted as a
    constructor argument for peft habits but may only name the task head.
    """

    preset: str = _field("all", "preset")
    roles: Optional[list[str]] = _field(None, "roles")
    include: Optional[list[str]] = _field(None, "include")
    exclude: Optional[list[str]] = _field(None, "exclude")
    layers: Optional[Union[str, int, list[int]]] = _field(None, "layers")
    add_missing: bool = _field(False, "add_missing")
    train_head: bool = _field(True, "train_head")
    pooler_head: bool = _field(True, "pooler_head")
    skip_zero_grad: bool = _field(False, "skip_zero_grad")
    frozen_dtype: Optional[str] = _field(None, "frozen_dtype")
    lean: bool = _field(True, "lean")
    strict_base: bool = field(
        default=True,
        metadata={
            "help": "Refuse to load this adapter onto a base model whose frozen weights differ from the one it was "
            "trained on (fingerprint in bitfit_meta). False loads anyway, with a warning."
        },
    )
    bitfit_meta: Optional[dict] = field(
        default=None,
        metadata={
            "help": "Filled in by save_pretrained: the bitfit artifact header (base model name, config and fingerprint, "
            "trained slots with roles and encoding, head layout and labels, storage dtype). Loading checks the "
            "fingerprint; bitfit.peft.to_bitfit converts the folder with it. Leave it None for a new adapter."
        },
    )
    modules_to_save: InitVar[Optional[list[str]]] = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: Optional[str] = None, **kwargs):
        """peft's loader, with a local folder's damaged ``adapter_config.json`` refused clearly (naming the folder
        and the fix); the folder is remembered so that loading checks its tensors before the base model is
        prepared (see BitFitModel.inject_adapter)."""
        path = str(pretrained_model_name_or_path)
        if subfolder:
            path = os.path.join(path, subfolder)
        local = os.path.isfile(os.path.join(path, PEFT_CONFIG_NAME))
        if local:
            meta = read_peft_config(path).get("bitfit_meta")
            if meta is not None:  # None: a new adapter's config (save_pretrained of the config alone)
                check_header(meta, path)
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        if local:
            config._bitfit_source = path
        return config

    @classmethod
    def check_kwargs(cls, **kwargs):
        """peft's hook on a loaded adapter_config.json: a field the file lacks means what it meant before the
        field existed (``pooler_head``: False, the pooler stayed in the body), as in BitFitConfig.from_dict."""
        kwargs = super().check_kwargs(**kwargs)
        for name, value in LEGACY_DEFAULTS.items():
            kwargs.setdefault(name, value)
        return kwargs

    def __post_init__(self, modules_to_save=None) -> None:
        super().__post_init__()
        self.peft_type = ensure_peft_type()
        sel = (self.bitfit_meta or {}).get("bitfit_config") if isinstance(self.bitfit_meta, dict) else None
        if isinstance(sel, dict):
            # a saved adapter: its tensors were trained with the header's pooler_head (absent: saved before the
            # option, the pooler stayed in the body); the header decides, whatever the config file says
            self.pooler_head = bool(sel.get("pooler_head", LEGACY_DEFAULTS["pooler_head"]))
        for name in ("roles", "include", "exclude"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                setattr(self, name, list(value))
        if isinstance(self.layers, tuple):
            self.layers = list(self.layers)
        if modules_to_save:
            if isinstance(modules_to_save, str):
                modules_to_save = [modules_to_save]
            if not self.train_head:
                raise BitFitConfigError(
                    f"contradictory options: modules_to_save={list(modules_to_save)} with train_head=False; BitFit "
                    "trains the task head through train_head"
                )
        # checked against the model's head when the adapter is added (not saved: train_head says it)
        self._bitfit_head_names = list(modules_to_save or [])
        self.to_bitfit_config()  # every BitFitConfig check, now rather than at get_peft_model

    def to_bitfit_config(self) -> BitFitConfig:
        """The :class:`bitfit.BitFitConfig` with this config's selection fields."""
        known = {f.name for f in dataclasses.fields(BitFitConfig)}
        return BitFitConfig(**{k: getattr(self, k) for k in SELECTION_FIELDS if k in known})


# The InitVar's default is left on the class by dataclasses; without it, `hasattr(config,
# "modules_to_save")` is False, so peft's sequence-classification wrapper does not put the head in a
# ModulesToSaveWrapper copy: the head trains in place, as bitfit.apply does.
del BitFitPeftConfig.modules_to_save

assert {f.name for f in dataclasses.fields(BitFitPeftConfig)} >= set(SELECTION_FIELDS)
