"""Adapting a backbone with a self-supervised objective: the epochs, the top stages that
learn, BatchNorm statistics that follow the new domain, and a checkpoint after every epoch
from which a stopped run resumes."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from ftune.models.backbones import Backbone
from ftune.models.data.source import ImageSource
from ftune.models.data.transforms import normalize
from ftune.models.preprocessing import Preprocessing
from ftune.models.pretrain.objectives import build_objective
from ftune.models.recipe import rules
from ftune.models.spec import PretrainSpec
from ftune.models.training.checkpoint import atomic_torch_save, restore_rng_state, rng_state
from ftune.models.training.loop import stop_if_asked
from ftune.models.training.run import epoch_order, samples_per_epoch
from ftune.models.training.runtime import Precision

log = logging.getLogger(__name__)

CHECKPOINT = "pretrain.pt"


@dataclass
class PretrainRun:
    backbone: Backbone  # its model is adapted in place
    spec: PretrainSpec
    precision: Precision
    seed: int
    should_stop: Callable[[], bool] | None = None
    on_epoch: Callable[[dict], None] | None = None  # each epoch's row, as it ends
    checkpoint_dir: Path | None = None

    @property
    def adapting_stages(self) -> int:
        return int(rules.pretrain_stages(self.spec.stages, len(self.backbone.stages)).value)

    def run(self, images: ImageSource) -> list[dict]:
        """Adapt on ``images`` (a source of unlabelled uint8 images); the epochs' rows."""
        model, device = self.backbone.model, self.precision.device
        torch.manual_seed(self.seed)
        objective = build_objective(self.spec.method, model, self.backbone.num_features)
        objective.to(device)
        params = self._trainable(objective)
        optimizer = torch.optim.Adam(params, lr=self.spec.lr)
        scaler = torch.amp.GradScaler(device.type, enabled=self.precision.needs_grad_scaler)
        history: list[dict] = []
        start = self._resume(objective, optimizer, history)
        prep = self.backbone.preprocessing
        keep = samples_per_epoch(len(images), self.spec.batch_size)
        for epoch in range(start, self.spec.epochs):
            started = time.perf_counter()
            self._train_mode(objective)
            losses = []
            for raw, _, _ in images.batches(epoch_order(self.seed, epoch, len(images), keep),
                                            self.spec.batch_size):
                stop_if_asked(self.should_stop)
                with self.precision.autocast():
                    loss = objective.loss(raw.to(device).float(),
                                          lambda batch: normalize(batch, prep))
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                losses.append(float(loss.detach()))
            if not losses or not math.isfinite(sum(losses)):
                raise FloatingPointError(f"pretraining loss is not finite at epoch {epoch + 1}; "
                                         "lower pretrain.lr")
            row = {"epoch": epoch + 1, "stage": "pretrain", "method": self.spec.method,
                   "pretrain_loss": sum(losses) / len(losses),
                   "seconds": time.perf_counter() - started}
            history.append(row)
            self._save(objective, optimizer, history)
            if self.on_epoch is not None:
                self.on_epoch(row)
        recalibrate_batchnorm(model, images, self.spec.batch_size, prep, self.precision,
                              self._adapting_norms())
        for param in model.parameters():
            param.requires_grad_(True)
        model.eval()
        return history

    def _adapting_norms(self) -> list[_BatchNorm]:
        """The BatchNorm layers whose statistics follow the new images."""
        norms = [m for m in self.backbone.model.modules() if isinstance(m, _BatchNorm)]
        if self.spec.batchnorm == "all":
            return norms
        return [m for m in norms if any(p.requires_grad for p in m.parameters(recurse=False))]

    def _train_mode(self, objective: torch.nn.Module) -> None:
        objective.train()
        adapting = {id(m) for m in self._adapting_norms()}
        for module in self.backbone.model.modules():
            if isinstance(module, _BatchNorm) and id(module) not in adapting:
                module.eval()

    def _trainable(self, objective: torch.nn.Module) -> list[torch.nn.Parameter]:
        stages = self.backbone.stages
        adapting = {name for stage in stages[len(stages) - self.adapting_stages:]
                    for name in stage}
        for name, param in self.backbone.model.named_parameters():
            param.requires_grad_(name in adapting)
        backbone_ids = {id(p) for p in self.backbone.model.parameters()}
        return [p for p in objective.parameters()
                if p.requires_grad or id(p) not in backbone_ids]

    def _resume(self, objective: torch.nn.Module, optimizer: torch.optim.Optimizer,
                history: list[dict]) -> int:
        path = self._checkpoint_path()
        if path is None or not path.is_file():
            return 0
        state = torch.load(path, map_location=self.precision.device, weights_only=True)
        if state.get("spec") != self.spec.model_dump(mode="json"):
            return 0  # another pretraining's checkpoint: start afresh
        objective.load_state_dict(state["objective"])
        optimizer.load_state_dict(state["optimizer"])
        history.extend(state["history"])
        restore_rng_state(state["rng"])
        log.info("pretraining resumed after epoch %d", len(history))
        return len(history)

    def _save(self, objective: torch.nn.Module, optimizer: torch.optim.Optimizer,
              history: list[dict]) -> None:
        path = self._checkpoint_path()
        if path is None:
            return
        atomic_torch_save({"objective": objective.state_dict(),
                           "optimizer": optimizer.state_dict(), "history": history,
                           "spec": self.spec.model_dump(mode="json"), "rng": rng_state()}, path)

    def _checkpoint_path(self) -> Path | None:
        if self.checkpoint_dir is None:
            return None
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        return self.checkpoint_dir / CHECKPOINT


@torch.no_grad()
def recalibrate_batchnorm(model: torch.nn.Module, images: ImageSource, batch_size: int,
                          prep: Preprocessing, precision: Precision,
                          norms: list[_BatchNorm]) -> None:
    """``norms``' statistics of the clean images, averaged over one pass (as AdaBN, Li et
    al. 2016): during pretraining they followed masked, noisy or colour-jittered inputs,
    which fine-tuning and prediction never see. The other layers keep theirs."""
    if not norms or not len(images):
        return
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the pass
    model.eval()
    for norm in norms:
        norm.train()
    device = precision.device
    for raw, _, _ in images.batches(torch.arange(len(images)), batch_size):
        if len(raw) < 2:
            continue
        with precision.autocast():
            model(normalize(raw.to(device).float(), prep))
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
