"""BitFit's ``transformers.Trainer`` subclass: the head's (and an untrained pooler's) own learning rate, role
and layer learning-rate groups, the halving schedule, the norm-gain pull, length sub-batches on a CPU,
the chunked causal-LM loss, the non-finite guard, and checkpoints that hold only the trained tensors.

transformers is imported when the class is first asked for (:func:`_trainer_class`), not with the module."""

import os
from collections.abc import Mapping
from typing import Optional

import torch

from ..errors import BitFitConfigError, BitFitError
from .runfolder import json_safe


def _trainer_class():
    from transformers import Trainer

    class BitFitTrainer(Trainer):
        """Trainer that (for BitFit models) gives the head its own learning rate, writes only the
        trained tensors to checkpoints, and loads them back without warning about frozen keys."""

        head_learning_rate: Optional[float] = None
        pooler_learning_rate: Optional[float] = None  # an untrained pooler in the head (pooler_head): its own rate
        role_lr_multipliers: Optional[dict] = None  # role -> factor on the learning rate (bitfit.methods.lrgroups)
        layer_lr_decay: Optional[float] = None
        halve_every_epochs: Optional[float] = None
        norm_weight_l2: Optional[float] = None
        _bitfit_steps_per_epoch: Optional[int] = None
        length_sub_batches: bool = False  # run_train: --length_sub_batches (bitfit.fast.subbatch)
        _sub_batch_share: Optional[float] = None
        checkpoint_record: Optional[dict] = None  # run_train: written into each checkpoint (bitfit.training.resume)

        def __init__(self, *args, **kwargs):
            from .guard import NonFiniteGuard

            super().__init__(*args, **kwargs)
            # every step's real loss and the trained tensors: a NaN/inf stops the run before it is saved
            self.guard = NonFiniteGuard(self.model)
            self.add_callback(self.guard)

        def training_step(self, model, inputs, num_items_in_batch=None):
            parts = self._length_sub_batches(inputs)
            if parts is None:
                loss = super().training_step(model, inputs, num_items_in_batch)
            else:  # the random batch as sub-batches of similar length: its gradient, less padding (bitfit.fast.subbatch)
                loss = 0
                try:
                    for sub, share in parts:
                        self._sub_batch_share = share
                        # no item count: each sub-batch's loss is its rows' mean, weighted by its share below
                        loss = loss + super().training_step(model, sub, None)
                finally:
                    self._sub_batch_share = None
            self.guard.observe_loss(loss)
            return loss

        def floating_point_ops(self, inputs):
            # Trainer's FLOP estimate walks every module each step (model.num_parameters): count the parameters once
            model = self.model
            main = getattr(model, "main_input_name", "input_ids")
            if main not in inputs or not hasattr(model, "num_parameters"):
                return super().floating_point_ops(inputs)
            cached = getattr(self, "_bitfit_flop_params", None)
            if cached is None or cached[0] is not model:
                cached = self._bitfit_flop_params = (model, model.num_parameters(exclude_embeddings=True))
            return 6 * inputs[main].numel() * cached[1]

        def _length_sub_batches(self, inputs):
            """The batch's sub-batches and their shares of its rows, or None to run it whole: a model whose layers
            skip the padding themselves (bitfit.fast.packing: one call is cheaper), off, not on a CPU (an accelerator's
            step is bound by calls, not padding), gradient accumulation (whose loss scaling transformers decides
            per model), several processes (each backward would all-reduce), or a loss that is not a plain mean
            over the batch's rows (a custom loss, label smoothing)."""
            from ..fast import subbatch
            from ..fast.lean import packs

            if packs(self.model):
                return None
            if not self.length_sub_batches or self.args.device.type != "cpu" or self.label_smoother is not None \
                    or self.compute_loss_func is not None or not isinstance(inputs, Mapping) \
                    or self.args.gradient_accumulation_steps != 1 or self.args.world_size > 1:
                return None
            return subbatch.split(inputs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = self._loss(model, inputs, return_outputs, num_items_in_batch)
            share = self._sub_batch_share if model.training else None
            if share is None:
                return out
            return (out[0] * share, out[1]) if return_outputs else out * share  # a sub-batch's mean, weighted

        def _loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # causal-LM BitFit: LM head + cross-entropy in chunks over the labelled tokens, never the full
            # [batch, seq, vocab] logits (bitfit.fast.lmloss); in evaluation only where the logits are not wanted
            from ..fast import lmloss

            if not (self._bitfit_target() is not None and "labels" in inputs and self.label_smoother is None
                    and self.compute_loss_func is None and lmloss.enabled() and lmloss.applies(model)
                    and (model.training or (self.compute_metrics is None and self.preprocess_logits_for_metrics is None))):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            n_items = num_items_in_batch if self.model_accepts_loss_kwargs else None
            loss, outputs = lmloss.model_loss(model, inputs, n_items)
            if self.args.average_tokens_across_devices and n_items is not None:  # as Trainer.compute_loss
                loss = loss * (self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1
                               else self.args.n_gpu)
            return (loss, outputs) if return_outputs else loss

        def log(self, logs, *args, **kwargs):
            # non-finite values (a constant-prediction Pearson, ...) become None: trainer_state.json and
            # log_history.json stay strict JSON
            return super().log(json_safe(logs), *args, **kwargs)

        def _bitfit(self):
            from ..core.prepare import get_state

            return get_state(self.model)

        def _bitfit_target(self):
            """The model holding the BitFit state, a peft model of the BitFit method included (its optimizer
            is then built as the native one's: head learning rate, role / layer groups)."""
            from ..core.prepare import bitfit_model

            return bitfit_model(self.model)

        def _custom_lrs(self) -> bool:
            return bool(self.role_lr_multipliers) or self.layer_lr_decay not in (None, 1.0)

        def create_optimizer(self, model=None):
            if self.optimizer is not None:
                return self.optimizer
            from ..core.prepare import get_state

            target = self._bitfit_target()
            state = get_state(target) if target is not None else None
            if state is None and (self._custom_lrs() or self.norm_weight_l2):
                raise BitFitConfigError("--role_lr_multipliers, --layer_lr_decay and --norm_weight_l2 apply to BitFit "
                                        "runs (biases grouped by role and layer); this model has no BitFit state "
                                        "(full fine-tuning or another method)")
            if state is None or (self.head_learning_rate is None and self.pooler_learning_rate is None
                                 and not self._custom_lrs() and not self.norm_weight_l2):
                return super().create_optimizer(model)
            from ..methods.lrgroups import add_norm_pull, lr_factors, trained_roles

            opt_model = self.model if model is None else model
            factors = lr_factors(target, self.role_lr_multipliers, self.layer_lr_decay) if self._custom_lrs() else {}
            unused = sorted(set(self.role_lr_multipliers or ()) - trained_roles(target))
            if unused:
                import warnings

                warnings.warn(f"--role_lr_multipliers: role(s) {', '.join(unused)} train no tensor in this run; "
                              "their multipliers have no effect", stacklevel=2)
            # by identity: inside a peft model the names carry peft's prefix (base_model.model.)
            target_params = dict(target.named_parameters())
            head = {id(target_params[n]) for n in state.selection.head_params}
            pooler_path = state.model_map.pooler_head if self.pooler_learning_rate is not None else None
            pooler = {id(target_params[n]) for n in state.selection.head_params
                      if pooler_path and n.startswith(f"{pooler_path}.")}
            if self.pooler_learning_rate is not None and not pooler:
                import warnings

                warnings.warn("--pooler_learning_rate: this model has no untrained pooler in its head (a pretrained "
                              "pooler trains only its bias, with the body); the option has no effect", stacklevel=2)
            decay = set(self.get_decay_parameter_names(opt_model))
            groups: dict = {}
            for n, p in opt_model.named_parameters():
                if not p.requires_grad:
                    continue
                is_head = "pooler" if id(p) in pooler else id(p) in head
                key = (is_head, n in decay, None if is_head else factors.get(id(p), 1.0))
                groups.setdefault(key, []).append(p)
            param_groups = []
            base_lr = self.args.learning_rate
            for (is_head, is_decay, factor), params in groups.items():
                g = {"params": params, "weight_decay": self.args.weight_decay if is_decay else 0.0}
                if is_head == "pooler":
                    g["lr"] = self.pooler_learning_rate
                elif is_head:
                    if self.head_learning_rate is not None:
                        g["lr"] = self.head_learning_rate
                elif factor != 1.0:
                    g["lr"] = base_lr * factor
                param_groups.append(g)
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = cls(param_groups, **kwargs)
            if self.norm_weight_l2:
                self._norm_pull = add_norm_pull(self.optimizer, target, self.norm_weight_l2)
            return self.optimizer

        def set_initial_training_values(self, *args, **kwargs):
            values = super().set_initial_training_values(*args, **kwargs)
            self._bitfit_steps_per_epoch = values[1]  # num_update_steps_per_epoch, the Trainer's own count
            return values

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            if self.halve_every_epochs is None or self.lr_scheduler is not None:
                return super().create_scheduler(num_training_steps, optimizer)
            from ..methods.lrgroups import halving_period, halving_scheduler, steps_per_epoch

            spe = self._bitfit_steps_per_epoch or steps_per_epoch(len(self.get_train_dataloader()),
                                                                  self.args.gradient_accumulation_steps)
            self.lr_scheduler = halving_scheduler(optimizer if optimizer is not None else self.optimizer,
                                                  self.args.get_warmup_steps(num_training_steps),
                                                  halving_period(self.halve_every_epochs, spe))
            self._created_lr_scheduler = True
            return self.lr_scheduler

        def save_model(self, output_dir=None, _internal_call=False):
            from ..core.sharded import has_sharded

            if self._bitfit() is not None and has_sharded(self.model):
                # FSDP2: the Trainer would gather the whole state dict, frozen base included; a checkpoint
                # needs only the trained tensors, gathered on every rank by _save
                return self._save(output_dir)
            return super().save_model(output_dir, _internal_call)

        def _save(self, output_dir=None, state_dict=None):
            if self._bitfit() is None:
                return super()._save(output_dir, state_dict)
            from ..core.sharded import full, has_sharded, on_rank0

            output_dir = output_dir or self.args.output_dir
            sharded = has_sharded(self.model)  # DTensor parameters: every rank takes part in the gathers
            if not (self.args.should_save or sharded):
                return
            trained = {n: full(p).detach().cpu().contiguous() for n, p in self.model.named_parameters()
                       if p.requires_grad}
            if sharded:  # rank 0 writes, the others wait for it (an error there is raised on every rank)
                return on_rank0(lambda: self._write_trained(output_dir, trained), "saving the checkpoint")
            self._write_trained(output_dir, trained)

        def _write_trained(self, output_dir, trained):
            import safetensors.torch

            os.makedirs(output_dir, exist_ok=True)
            tmp = os.path.join(output_dir, "model.safetensors.tmp")
            safetensors.torch.save_file(trained, tmp, metadata={"format": "pt", "bitfit": "trained-only"})
            os.replace(tmp, os.path.join(output_dir, "model.safetensors"))
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
            from .resume import write_checkpoint_record

            write_checkpoint_record(output_dir, self.checkpoint_record)

        def _load_optimizer_and_scheduler(self, checkpoint):
            """Resume the optimizer (moment estimates) and the schedule (step count) from ``checkpoint``, with this
            run's rates and optimizer options: the checkpoint's learning rates are replaced by the ones this run
            was given (--learning_rate, --head_learning_rate, role / layer factors, --weight_decay, ...)."""
            import sys

            opt, sched = self.optimizer, self.lr_scheduler
            if checkpoint is None or opt is None:
                return super()._load_optimizer_and_scheduler(checkpoint)
            fresh = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
            try:
                super()._load_optimizer_and_scheduler(checkpoint)
            except (ValueError, RuntimeError, KeyError) as exc:
                raise BitFitError(
                    f"--resume_from_checkpoint {checkpoint}: its optimizer state does not fit this run ({exc}); the "
                    "checkpoint was trained with other parameter groups (another --preset, --head_learning_rate, "
                    "--pooler_learning_rate, --role_lr_multipliers or --layer_lr_decay): resume with the options it "
                    "was trained with, or start a new run (another --output-dir)") from None
            old = [g.get("initial_lr", g["lr"]) for g in opt.param_groups]
            new = [f.get("initial_lr", f["lr"]) for f in fresh]
            lambdas = getattr(sched, "lr_lambdas", None)
            for i, (g, f) in enumerate(zip(opt.param_groups, fresh)):
                for k, v in f.items():
                    if k != "lr":
                        g[k] = v
                if lambdas is not None and i < len(lambdas):
                    g["lr"] = new[i] * lambdas[i](sched.last_epoch)
                elif old[i]:
                    g["lr"] = g["lr"] * new[i] / old[i]
                else:
                    g["lr"] = new[i]
            if sched is not None and hasattr(sched, "base_lrs"):
                sched.base_lrs = list(new)
                if hasattr(sched, "_last_lr"):
                    sched._last_lr = [g["lr"] for g in opt.param_groups]
            if any(abs(a - b) > 1e-12 * max(abs(a), abs(b), 1e-30) for a, b in zip(old, new)):
                rates = ", ".join(f"{x:g}" for x in new)
                print(f"bitfit: resuming {checkpoint} with this run's learning rates ({rates}; the checkpoint trained "
                      f"with {', '.join(f'{x:g}' for x in old)})", file=sys.stderr)

        def _issue_warnings_after_load(self, load_result):
            if self._bitfit() is None:
                return super()._issue_warnings_after_load(load_result)
            trained = {n for n, p in self.model.named_parameters() if p.requires_grad}
            missing = [k for k in load_result.missing_keys if k in trained]
            if missing or load_result.unexpected_keys:
                raise BitFitError(f"checkpoint does not fit this model: missing trained tensors {missing[:5]}, "
                                  f"unexpected {list(load_result.unexpected_keys)[:5]}")

    return BitFitTrainer
