"""BitFitModel: the peft tuner of the BitFit method, built on bitfit.apply / save / load / merge.

peft's tuners usually wrap target layers in adapter layers holding per-adapter tensors. BitFit's
trained tensors are the model's own biases (and head), so this tuner keeps the *active* adapter
live in the model, prepared by :func:`bitfit.apply` exactly as without peft, and every other
adapter packed as the bitfit artifact it would save (a few hundred KB). ``set_adapter`` packs the
live one and loads the other with :func:`bitfit.load`; ``merge_and_unload`` is
:func:`bitfit.merge`, ``unload`` is :func:`bitfit.unmerge`. Adapter files are bitfit artifacts
under peft's names (see :mod:`bitfit.peft.convert`).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from ..errors import ArtifactError, BitFitConfigError
from ..core.models import dequantized, gguf_quantized
from ..core.prepare import apply, get_state, trainable_bias_param
from .config import BitFitPeftConfig
from .convert import (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, Packed, check_peft_dir, from_peft_tensors, pack,
                      read_peft_config, to_artifact, to_peft_tensors)

if not hasattr(BaseTuner, "_remap_adapter_state_dict_for_load"):  # the per-method state-dict hooks came in 0.21
    import peft

    raise ImportError(f"bitfit.peft needs peft>=0.21; found peft {peft.__version__}: pip install -U 'peft>=0.21'")


@dataclass
class _Adapters:
    """Per tuner: which adapter is live in the model, and the packed others."""

    live: Optional[str] = None
    packed: dict = field(default_factory=dict)  # adapter name -> Packed, or None (new, never trained)
    params: list = field(default_factory=list)  # the live adapter's trainable tensors
    disabled: Optional[dict] = None  # while disable_adapter() runs: the live values put aside
    merged: bool = False  # merge_and_unload() folded the live adapter into the weights


class BitFitStatus(nn.Module, BaseTunerLayer):
    """BitFit's entry in peft's layer status (``get_model_status``, which ``disable_adapter`` reads).

    BitFit adds no adapter layers; this parameter-free module stands for the method as a whole:
    enabled or not, the active adapter, the available ones. The tuner keeps its fields current.
    """

    def __init__(self):
        nn.Module.__init__(self)
        self._active_adapter = []
        self._disable_adapters = False
        self.merged_adapters = []
        self.available = []

    def _get_available_adapters(self) -> set:
        return set(self.available)

    def enable_adapters(self, enabled: bool) -> None:  # the tuner switches the values; see BitFitModel
        self._disable_adapters = not enabled

    def forward(self, *args, **kwargs):  # pragma: no cover
        raise RuntimeError("BitFitStatus is not a layer of the model")


class _Configs(dict):
    """The tuner's ``peft_config``: a dict whose ``name in configs`` refuses a list of names clearly (BitFit runs
    one adapter at a time; peft's own check would raise a raw TypeError: unhashable type)."""

    def __contains__(self, key) -> bool:
        if isinstance(key, (list, tuple, set)):
            raise BitFitConfigError(
                f"BitFit runs one adapter at a time; got the adapter names {list(key)}: pass one name, e.g. "
                f"set_adapter({next(iter(key), 'default')!r})"
            )
        return super().__contains__(key)


def _tuner_of(model: nn.Module) -> "BitFitModel":
    for m in model.modules():
        if isinstance(m, BitFitModel):
            return m
    raise ArtifactError("this model has no BitFit peft tuner (get_peft_model with a BitFitPeftConfig)")


class BitFitModel(BaseTuner):
    """The peft tuner of :class:`~bitfit.peft.BitFitPeftConfig` (registered as peft method ``bitfit``).

    Built by ``peft.get_peft_model(model, BitFitPeftConfig(...))``; use it through the returned
    ``PeftModel`` (``print_trainable_parameters``, ``save_pretrained``, ``load_adapter``,
    ``set_adapter``, ``disable_adapter``, ``merge_and_unload``, ``unload``). One adapter is active at a
    time.
    """

    prefix: str = "bitfit_"
    tuner_layer_cls = BaseTunerLayer  # BitFit adds no adapter layers
    target_module_mapping: dict = {}

    def __init__(self, model, peft_config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None):
        self.__dict__["_adapters"] = _Adapters()  # BaseTuner.__init__ injects the first adapter
        super().__init__(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        self.peft_config = _Configs(self.peft_config)
        self.model.peft_config = self.peft_config
        self.bitfit_status = BitFitStatus()
        self._sync_status()

    def _sync_status(self) -> None:
        status = self.__dict__["_modules"].get("bitfit_status")
        if status is not None:
            ad = self._adapters
            status._active_adapter = [ad.live] if ad.live is not None else []
            status._disable_adapters = ad.disabled is not None
            status.available = list(self.peft_config)

    def __getattr__(self, name: str):
        # bitfit's state lives on the wrapped model; it is not forwarded, so the peft wrapper is never taken
        # for a plain BitFit model (bitfit.get_state(peft_model) is None; use peft_model.get_base_model()).
        if name.startswith("_bitfit"):
            raise AttributeError(name)
        return super().__getattr__(name)

    # ------------------------------------------------------------------ adding adapters
    def _create_and_replace(self, *args, **kwargs):  # pragma: no cover - peft's layer injection is not used
        raise NotImplementedError("BitFit adds no adapter layers")

    def _prepare_adapter_config(self, peft_config, model_config):
        return peft_config

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """No-op: bitfit.apply keeps trained tensors float32 whatever the frozen dtype."""

    def _check_head_names(self, model: nn.Module, cfg: BitFitPeftConfig) -> None:
        from ..core.roles import head_module_names

        wanted = getattr(cfg, "_bitfit_head_names", None) or []
        heads = head_module_names(model, pooler_head=cfg.pooler_head)[0]
        bad = [n for n in wanted if n not in heads]
        if bad:
            hint = ""
            if not cfg.pooler_head and any(n in head_module_names(model, pooler_head=True)[0] for n in bad):
                hint = " (an untrained pooler is part of the head with pooler_head=True)"
            raise BitFitConfigError(
                f"modules_to_save={wanted}: {bad} is not the task head of this {type(model).__name__} "
                f"(its head: {heads or 'none'}){hint}. BitFit trains biases and the head (train_head); to fully "
                "train other modules use another peft method"
            )

    def _check_base(self, model: nn.Module, cfg: BitFitPeftConfig, adapter_name: str) -> None:
        from ..artifacts import fingerprint

        meta = cfg.bitfit_meta or {}
        want = (meta.get("base_model") or {}).get("fingerprint")
        if not want:
            return
        got = fingerprint(model)
        if got == want:
            return
        name = meta["base_model"].get("name") or meta["base_model"].get("architecture")
        msg = (
            f"BitFit adapter {adapter_name!r} was trained on base model {name!r} (fingerprint {want}) but this model's "
            f"frozen weights differ (fingerprint {got}); load it onto {name!r}"
        )
        if cfg.strict_base:
            raise ArtifactError(
                msg + ". To start a new adapter on this model use a fresh BitFitPeftConfig (bitfit_meta=None); to load "
                "anyway set strict_base=False in the adapter config"
            )
        warnings.warn(msg + "; loading anyway because strict_base=False", stacklevel=4)

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        """Add adapter ``adapter_name``: the first one is prepared live by bitfit.apply; later ones are only
        checked (peft leaves a newly added adapter inactive)."""
        from ..core.select import resolve

        cfg = self.peft_config[adapter_name]
        if not isinstance(cfg, BitFitPeftConfig):
            raise BitFitConfigError(f"adapter {adapter_name!r}: expected a BitFitPeftConfig, got {type(cfg).__name__}")
        bcfg = cfg.to_bitfit_config()
        if gguf_quantized(model):
            # transformers unpacks a GGUF file's weights to float tensors on load but leaves the model marked as
            # quantized, and Trainer / TRL's SFTTrainer then refuse to train it: the mark is cleared (a GGUF model
            # that kept packed weights is refused here)
            dequantized(model)
        source = getattr(cfg, "_bitfit_source", None)
        if source is not None and (cfg.bitfit_meta is not None or os.path.isfile(os.path.join(source, PEFT_WEIGHTS_NAME))):
            # an adapter folder being loaded: a damaged or incomplete one is refused now, naming its folder and
            # files, before the base model is prepared (peft would fall back to the Hub for missing weights)
            check_peft_dir(source)
        self._check_head_names(model, cfg)
        self._check_base(model, cfg, adapter_name)
        ad = self._adapters
        if ad.live is None:
            apply(model, config=bcfg)
            ad.live = adapter_name
            self._track_live(trainable=not cfg.inference_mode)
        else:
            state = get_state(model)
            resolve(state.model_map, bcfg)  # a selection that does not fit fails now, not at set_adapter
        ad.packed[adapter_name] = None
        self._sync_status()

    # ------------------------------------------------------------------ the live adapter
    def _track_live(self, trainable: bool) -> None:
        model = self.model
        state = get_state(model)
        params = [trainable_bias_param(model, s.name) for s in state.trained_slots()]
        named = dict(model.named_parameters())
        params += [named[n] for n in state.selection.head_params]
        self._adapters.params = params
        for p in params:
            p.requires_grad_(trainable)

    def _activate(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the live adapter (the previous live one must be packed already)."""
        from ..artifacts import load, unmerge

        model, ad = self.model, self._adapters
        cfg = self.peft_config[adapter_name]
        packed = ad.packed.get(adapter_name)
        if packed is not None:
            state = get_state(model)
            if state is not None and bool(state.config.pooler_head) != bool(
                    (packed.meta.get("bitfit_config") or {}).get("pooler_head", False)):
                # the untrained pooler is head in one adapter and body in the other: a different model map,
                # found again on the base values
                unmerge(model)
            load(model, to_artifact(packed, f"(adapter {adapter_name!r})"), strict=cfg.strict_base)
        else:
            if get_state(model) is not None:
                unmerge(model)
            apply(model, config=cfg.to_bitfit_config())
        ad.live = adapter_name

    def _pack_live(self) -> None:
        ad = self._adapters
        if ad.live is not None:
            self._enable_adapter_layers(True)
            ad.packed[ad.live] = pack(self.model)

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        """Make ``adapter_name`` the active adapter (trainable unless ``inference_mode``)."""
        if isinstance(adapter_name, (list, tuple)):
            if len(adapter_name) != 1:
                raise ValueError(f"BitFit runs one adapter at a time; got {list(adapter_name)}")
            adapter_name = adapter_name[0]
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} not found; adapters: {list(self.peft_config)}")
        ad = self._adapters
        if adapter_name != ad.live:
            self._pack_live()
            self._activate(adapter_name)
        self._track_live(trainable=not inference_mode)
        self.active_adapter = adapter_name
        self._sync_status()

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        """Trainability of the live adapter's tensors (packed, inactive adapters have none)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if self._adapters.live in names:
            for p in self._adapters.params:
                p.requires_grad_(requires_grad)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        """bitfit.apply already froze everything but the selection."""

    # ------------------------------------------------------------------ disable / enable (base outputs, in place)
    @torch.no_grad()
    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        """Disabled: the live adapter's tensors hold the base values (added biases zero), bit for bit the base
        model's outputs. Values are copied in place, so parameters (and an optimizer's references) stay."""
        ad, model = self._adapters, self.model
        state = get_state(model)
        if state is None or ad.live is None:
            return
        named = dict(model.named_parameters())
        if not enabled and ad.disabled is None:
            slots, head = {}, {}
            for slot in state.trained_slots():
                p = trainable_bias_param(model, slot.name)
                slots[slot.name] = p.detach().clone()
                if slot.name in state.added:
                    p.zero_()
                else:
                    p.copy_(state.base[slot.name].to(p.dtype))
            for name in state.selection.head_params:
                head[name] = named[name].detach().clone()
                named[name].copy_(state.base[name].to(named[name].dtype))
            ad.disabled = {"slots": slots, "head": head}
            self._sync_status()
        elif enabled and ad.disabled is not None:
            for name, value in ad.disabled["slots"].items():
                trainable_bias_param(model, name).copy_(value)
            for name, value in ad.disabled["head"].items():
                named[name].copy_(value)
            ad.disabled = None
            self._sync_status()

    def disable_adapter_layers(self) -> None:
        self._enable_adapter_layers(False)

    def enable_adapter_layers(self) -> None:
        self._enable_adapter_layers(True)

    # ------------------------------------------------------------------ delete / merge / unload
    def delete_adapter(self, adapter_name: str) -> None:
        from ..artifacts import unmerge

        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        if len(self.peft_config) == 1:
            raise ArtifactError(
                f"adapter {adapter_name!r} is this model's only BitFit adapter, and the model cannot run without one: "
                "use unload() for the base model (merge_and_unload() to keep the adapter in the weights), or add "
                "another adapter first"
            )
        ad = self._adapters
        del self.peft_config[adapter_name]
        ad.packed.pop(adapter_name, None)
        if adapter_name == ad.live:
            ad.disabled = None
            unmerge(self.model)
            ad.live, ad.params = None, []
            remaining = list(self.peft_config)
            if remaining:
                self._activate(remaining[0])
                self._track_live(trainable=not self.peft_config[remaining[0]].inference_mode)
            self.active_adapter = remaining[0] if remaining else []
        self._sync_status()

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names: Optional[list] = None):
        from ..artifacts import merge as bitfit_merge
        from ..artifacts import unmerge

        if self._adapters.merged:
            raise ArtifactError(
                "this model's BitFit adapter was already merged into its weights by merge_and_unload(); the base "
                f"values are gone, so {'merge_and_unload' if merge else 'unload'}() cannot give a model again: use the "
                "model merge_and_unload() returned, or load a fresh base model (and the adapter) for the unmerged base"
            )
        if adapter_names:
            if len(adapter_names) != 1:
                raise ValueError(f"BitFit merges one adapter at a time; got {list(adapter_names)}")
            self.set_adapter(adapter_names[0])
        ad, model = self._adapters, self.model
        self._enable_adapter_layers(True)
        if merge and safe_merge:
            bad = [i for i, p in enumerate(ad.params) if not torch.isfinite(p).all()]
            if bad:
                raise ValueError(f"adapter {ad.live!r} has non-finite values in {len(bad)} tensor(s); not merged")
        if get_state(model) is not None:
            (bitfit_merge if merge else unmerge)(model)
        ad.live, ad.params, ad.packed = None, [], {}
        ad.merged = merge
        if "peft_config" in model.__dict__:
            del model.peft_config
        return model

    # ------------------------------------------------------------------ state dict (peft's save / load hooks)
    def _packed_for(self, adapter_name: str) -> Packed:
        ad = self._adapters
        if adapter_name == ad.live:
            if ad.disabled is not None:
                # inside disable_adapter() the live tensors hold the base values: the adapter's own values are put
                # back for the save (as a LoRA adapter saves its weights there), then the base values again
                self._enable_adapter_layers(True)
                try:
                    return pack(self.model)
                finally:
                    self._enable_adapter_layers(False)
            return pack(self.model)
        packed = ad.packed.get(adapter_name)
        if packed is None:  # added but never active: what it holds is what bitfit.apply starts from
            live = ad.live
            self.set_adapter(adapter_name)
            packed = pack(self.model)
            if live is not None:
                self.set_adapter(live)
        return packed

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """Save: the adapter's bitfit artifact (bitfit.save), its tensors under peft keys; its header goes
        into the adapter config (``bitfit_meta``), which peft writes next."""
        packed = _tuner_of(model)._packed_for(adapter_name)
        config.bitfit_meta = packed.meta
        return to_peft_tensors(packed)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        return key  # the keys carry no adapter name

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Load: the tensors and the config's header are a bitfit artifact; it is validated and then loaded
        with bitfit.load (live adapter) or kept packed (inactive one). Nothing is left for peft to load."""
        tuner = _tuner_of(model)
        # the header in memory may be another save's (the Trainer loads its best checkpoint into the live
        # adapter): the slots' encodings come from the tensors
        packed = from_peft_tensors(config.bitfit_meta, state_dict, f"(adapter {adapter_name!r})", stored_encoding=True)
        art = to_artifact(packed, f"(adapter {adapter_name!r})")  # every check of bitfit's reader
        ad = tuner._adapters
        if adapter_name == ad.live:
            from ..artifacts import load

            ad.disabled = None
            load(tuner.model, art, strict=config.strict_base)
            tuner._track_live(trainable=not config.inference_mode)
        else:
            tuner._check_base(tuner.model, config, adapter_name)
            ad.packed[adapter_name] = packed
        tuner._sync_status()
        return {}


def _check_local_configs() -> None:
    """Have peft's config-type lookup (the first read of ``PeftModel.from_pretrained`` / ``load_adapter``) refuse a
    local folder's damaged ``adapter_config.json`` with one clear line naming the folder, the file and the fix,
    where peft itself would raise a raw JSONDecodeError, TypeError, RecursionError or KeyError. Folders that read
    well go to peft's own lookup unchanged."""
    from peft.config import PeftConfigMixin
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    lookup = PeftConfigMixin.__dict__.get("_get_peft_type")
    original = getattr(lookup, "__func__", None)
    if original is None or getattr(original, "_bitfit_checked", False):  # another peft layout, or done already
        return

    def _get_peft_type(cls, model_id, **hf_hub_download_kwargs):
        subfolder = hf_hub_download_kwargs.get("subfolder")
        path = os.path.join(str(model_id), subfolder) if subfolder is not None else str(model_id)
        if os.path.isfile(os.path.join(path, PEFT_CONFIG_NAME)):
            kind = read_peft_config(path).get("peft_type")
            if not isinstance(kind, str) or kind not in PEFT_TYPE_TO_CONFIG_MAPPING:
                raise ArtifactError(
                    f"adapter {path}: {PEFT_CONFIG_NAME} names peft_type {kind!r}, which is not a method this peft "
                    f"knows (a BitFit adapter has {'BITFIT'!r}); the file is damaged, or the adapter needs a newer "
                    "peft or the library that registers its method: restore the folder from a good copy"
                )
        return original(cls, model_id, **hf_hub_download_kwargs)

    _get_peft_type._bitfit_checked = True
    PeftConfigMixin._get_peft_type = classmethod(_get_peft_type)


def register() -> None:
    """Register ``bitfit`` with peft (idempotent): get_peft_model / PeftModel.from_pretrained then know it."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    from .config import ensure_peft_type

    peft_type = ensure_peft_type()
    _check_local_configs()
    have = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
    if have is BitFitModel:
        return
    if have is not None:
        raise ImportError(f"peft already has a method registered as 'bitfit' ({have.__module__}.{have.__name__})")
    register_peft_method(name="bitfit", config_cls=BitFitPeftConfig, model_cls=BitFitModel, prefix="bitfit_")


register()
