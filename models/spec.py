"""The fine-tuning spec: one pydantic model, no torch import.

The API process validates specs with this module alone, so it must stay cheap to
import. Every field has a default, so ``FineTuneSpec()`` (the JSON ``{}``) is a
complete, sensible spec. Unknown fields are rejected (``extra="forbid"``) so a
typo never silently falls back to a default.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ftune.models.auto_fields import Auto, AutoFloat, AutoInt
from ftune.models.tuning.optimizers import OptimizerName

__all__ = [
    "EarlyStoppingSpec",
    "FineTuneSpec",
    "FreezeSpec",
    "HeadSpec",
    "OptimizerSpec",
    "PretrainSpec",
    "PseudoLabelSpec",
    "ScheduleSpec",
    "SpecError",
    "ValidationError",
    "parse_spec",
]


# A hidden layer of 4096 after a 1280-wide backbone is 5M parameters: plenty for a head.
MAX_HIDDEN_WIDTH = 4096


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class FreezeSpec(_Strict):
    strategy: Literal["auto", "head_only", "last_n_blocks", "gradual", "none"] = Field(
        "auto",
        description="auto: two stages, the head alone on cached features until validation "
        "stops improving, then the top stages with it (how many follows from the dataset "
        "size and the preset; `epochs` bounds this second stage); "
        "head_only: only the new head trains; last_n_blocks: the last n backbone "
        "stages and the head; gradual: start head-only and unfreeze one more stage from the top "
        "every `unfreeze_every` epochs; none: everything trains.",
    )
    n_blocks: int = Field(1, ge=1, description="Stages trained by last_n_blocks.")
    unfreeze_every: int = Field(1, ge=1, description="Epochs between unfreezing steps (gradual).")
    batchnorm: Literal["frozen", "train"] = Field(
        "frozen",
        description="frozen: BatchNorm layers of frozen stages stay in eval mode (running "
        "statistics untouched); train: they keep updating their statistics.",
    )


class HeadSpec(_Strict):
    dropout: Annotated[float | Auto, AutoFloat(at_least=0.0, at_most=0.99)] = Field(
        "auto", description="Dropout before each linear layer. auto: 0 when the head alone "
        "trains, on cached features (early stopping regularises a head on fixed features, "
        "and dropout slows it down); 0.2 when backbone stages train.")
    hidden: list[Annotated[int, Field(ge=1, le=MAX_HIDDEN_WIDTH)]] = Field(
        default_factory=list, max_length=8, description="Widths of hidden layers in the head "
        f"(at most {MAX_HIDDEN_WIDTH} each)."
    )
    activation: Literal["relu", "leaky_relu", "elu", "selu", "gelu"] = "relu"
    batchnorm: bool = Field(False, description="BatchNorm1d after each hidden linear layer.")
    init: Literal["he", "glorot"] = Field("he", description="Weight init; biases start at zero.")


class OptimizerSpec(_Strict):
    # The names come from the optimizer table (torch-free): one list for the spec and the factory.
    name: Literal["auto", OptimizerName] = Field("auto", description="auto: Adam.")
    lr: Annotated[float | Auto, AutoFloat(above=0.0, at_most=10.0)] = Field(
        "auto", description="auto: a learning-rate range test on the cached features picks "
        "the head's rate; stages that train get the same rate, at most 1e-3 (lower stages "
        "less when layer_decay is set).")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="Used by momentum/nesterov/rmsprop.")
    weight_decay: float = Field(
        0.0, ge=0.0, le=1.0, description="L2 penalty; never applied to biases or norm parameters."
    )
    layer_decay: Annotated[float | Auto | None,
                           AutoFloat(above=0.0, at_most=1.0, nullable=True)] = Field(
        "auto",
        description="Discriminative LR: the last backbone stage gets lr*f, the one before "
        "lr*f^2, and so on; the head keeps lr. auto: off (null), one rate for the stages "
        "that train (0.7 and 0.85 measured worse with the few top stages auto trains).",
    )


class ScheduleSpec(_Strict):
    name: Literal["auto", "constant", "cosine", "step", "onecycle"] = Field(
        "auto", description="auto: constant while only the head trains, cosine with half an "
        "epoch of warmup (unless warmup_epochs is set) when backbone stages train.")
    warmup_epochs: float = Field(0, ge=0.0, description="Linear warmup from zero, in epochs.")


class EarlyStoppingSpec(_Strict):
    monitor: Literal["val_loss", "val_accuracy", "val_map"] = Field(
        "val_loss", description="val_map (mean average precision) is for multi-label jobs.")
    patience: Annotated[int | Auto, AutoInt(at_least=1)] = Field(
        "auto", description="Epochs without improvement before stopping. auto: 3; with "
        "freeze.strategy auto, the preset's for the head (4 with balanced) and the planned "
        "epochs for fine-tuning (its cosine schedule runs to the end).")
    min_delta: float = Field(0.0, ge=0.0, description="Smallest change that counts as better.")


class PretrainSpec(_Strict):
    method: Literal["none", "autoencoder", "contrastive"] = Field(
        "none", description="Adapt the backbone to the user's own images before fine-tuning, "
        "on the unlabelled images and the training images without their labels (never val "
        "or test). autoencoder: a small decoder reconstructs each image from the backbone's "
        "features of a masked, noisy copy (denoising, masked reconstruction); contrastive: "
        "SimSiam, two augmented views of an image pulled together, no negatives and no large "
        "batches. Needs unlabelled images (the dataset's unlabeled/ folder, or "
        "unlabeled_dataset_id).")
    epochs: int = Field(5, ge=1, le=1000, description="Passes over the pretraining images.")
    lr: float = Field(1e-3, gt=0.0, le=1.0, description="Adam's rate for the adapting stages "
                      "and the objective's own layers.")
    image_size: Annotated[int | Auto, AutoInt(at_least=16, at_most=1024)] = Field(
        "auto", description="auto: the fine-tuning image size.")
    stages: Annotated[int | Auto, AutoInt(at_least=1, at_most=64)] = Field(
        "auto", description="Top backbone stages whose weights adapt (auto: 2).")
    batchnorm: Literal["adapting", "all"] = Field(
        "adapting", description="Whose BatchNorm statistics follow the new images: the "
        "adapting stages' (the others keep ImageNet's, as frozen stages do in fine-tuning), "
        "or every stage's (AdaBN).")
    batch_size: int = Field(64, ge=2, le=4096)


class PseudoLabelSpec(_Strict):
    rounds: int = Field(0, ge=0, le=5, description="Self-training rounds after fine-tuning: "
                        "label the unlabelled images with the model, keep the confident ones "
                        "(balanced per class), train again. 0: off.")
    threshold: float = Field(0.9, gt=0.0, lt=1.0, description="Smallest predicted "
                             "probability an image's pseudo-label needs.")
    max_per_class: int | None = Field(None, ge=1, description="At most this many "
                                      "pseudo-labelled images per class and round.")


# Devices one job may ask for: the most a single machine holds.
MAX_DEVICES = 64


class FineTuneSpec(_Strict):
    backbone: str = Field(
        "tf_efficientnet_lite0", min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.\-]+$"
    )
    pretrained: bool = True
    task: Literal["auto", "single_label", "multi_label"] = Field(
        "auto", description="single_label: one class per image (softmax, cross-entropy); "
        "multi_label: a set of labels per image (a sigmoid per class, binary cross-entropy, "
        "a decision threshold per class chosen on val). auto: the dataset's, detected at "
        "upload (labels.csv with several labels per image is multi-label).")
    weights_path: str | None = Field(
        None, description="Local weights file for the backbone; overrides every other source."
    )
    preset: Literal["fast", "balanced", "best"] = Field(
        "balanced",
        description="What the auto fields aim for. fast: the head alone, on cached features; "
        "balanced: the head, then the top backbone stages; best: more stages, more epochs, "
        "stronger augmentation. Each has a time budget (see time_budget_s).")
    time_budget_s: float | None = Field(
        None, gt=0.0, le=7 * 86400,
        description="Plan the run to end within this many seconds; it ends with the best "
        "weights so far. Default: the preset's budget (fast 300, balanced 1800, best 7200), "
        "never more than the job's run-time limit.")
    image_size: Annotated[int | Auto | None,
                          AutoInt(at_least=16, at_most=1024, nullable=True)] = Field(
        "auto", description="Square input size. auto: from the images' median short side "
        "and the backbone's own size; null: the backbone's own.")
    epochs: Annotated[int | Auto, AutoInt(at_least=1, at_most=10_000)] = Field(
        "auto", description="auto: early stopping decides, within the time budget. With "
        "freeze.strategy auto, this bounds the second (fine-tuning) stage.")
    batch_size: int = Field(32, ge=1, le=4096)
    seed: int = Field(0, ge=0, le=2**32 - 1)
    val_fraction: float = Field(
        0.2, ge=0.0, lt=1.0, description="Held out (stratified) when the data has no val split."
    )
    freeze: FreezeSpec = Field(default_factory=FreezeSpec)
    head: HeadSpec = Field(default_factory=HeadSpec)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    early_stopping: EarlyStoppingSpec = Field(default_factory=EarlyStoppingSpec)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    grad_clip_norm: float | None = Field(None, gt=0.0)
    augment: Literal["auto", "none", "crop", "light", "strong"] = Field(
        "auto", description="crop: random resized crops (75-100% of the area); light: wider "
        "crops and horizontal flips (for classes a mirror image does not change); strong: "
        "also colour jitter. auto: none while the backbone is frozen (features are cached), "
        "crop when stages train (strong with preset best); choose light for flips when a "
        "mirror image is the same class.")
    class_weights: Literal["auto", "balanced", "none"] = Field(
        "auto", description="balanced weighs each class's loss by n/(C*n_c); multi-label: "
        "each label's positives by sqrt(negatives/positives), at most 10. auto: balanced "
        "when the largest class has 3 times the images of the smallest, or more (multi-label: "
        "when a label is on fewer than 1 image in 10).")
    refit: Literal["auto"] | bool = Field(
        "auto", description="When the best weights are a head trained alone on cached "
        "features and val is carved from the training images: train the head again on "
        "train+val for the epochs early stopping chose, so the model learns from every "
        "labelled image (val metrics are from before). auto: on in that case; true also "
        "refits on an explicit val split, and needs a head-alone spec.")
    pretrain: PretrainSpec = Field(default_factory=PretrainSpec)
    pseudo_labels: PseudoLabelSpec = Field(default_factory=PseudoLabelSpec)
    mixed_precision: Literal["auto", "off", "bf16", "fp16"] = "auto"
    devices: Annotated[int | Auto, AutoInt(at_least=1, at_most=MAX_DEVICES)] = Field(
        "auto", description="Devices (GPUs, or CPU ranks with FTUNE_DEVICE=cpu) the job trains "
        "on, data-parallel with one process per device; the batch is split across them, so "
        "batch_size means the same whatever the count. The job waits for a worker with that "
        "many. auto: all of its worker's GPUs when the backbone trains on enough images to "
        "gain from them, else one.")
    sync_batchnorm: Literal["auto"] | bool = Field(
        "auto", description="On several devices: BatchNorm layers that train normalise with "
        "the whole batch's statistics (true: the run computes what one device would), or "
        "each device's share of it, their running statistics averaged at every epoch's end "
        "(false: no communication per layer). auto: true on GPUs, false for CPU ranks, "
        "where each layer's exchange costs more than the step (bench/devices.py).")
    oom_retry: bool = Field(
        True, description="The service retries a run that runs out of memory once, with half "
        "the batch size (the job's events say so).")

    @model_validator(mode="after")
    def _warmup_fits(self) -> FineTuneSpec:
        if self.epochs != "auto" and self.schedule.warmup_epochs > self.epochs:
            raise ValueError(
                f"schedule.warmup_epochs ({self.schedule.warmup_epochs}) exceeds epochs "
                f"({self.epochs})"
            )
        return self

    @property
    def head_alone(self) -> bool:
        """Only the head trains: freeze.strategy head_only, or auto with preset fast (the one
        preset without a fine-tuning stage; tests hold this against the presets)."""
        return self.freeze.strategy == "head_only" or (
            self.freeze.strategy == "auto" and self.preset == "fast")

    @property
    def uses_unlabeled(self) -> bool:
        """Whether the spec needs unlabelled images."""
        return self.pretrain.method != "none" or self.pseudo_labels.rounds > 0

    @model_validator(mode="after")
    def _batch_splits_across_devices(self) -> FineTuneSpec:
        # BatchNorm in train mode needs two images per device in every step.
        if isinstance(self.devices, int) and self.devices > 1:
            if self.batch_size < 2 * self.devices:
                raise ValueError(
                    f"batch_size ({self.batch_size}) is split across devices ({self.devices}): "
                    f"it must be at least 2 per device ({2 * self.devices})")
            if self.uses_unlabeled:
                raise ValueError(
                    "pretrain and pseudo_labels run on one device: set devices to 1 or auto")
        return self

    @model_validator(mode="after")
    def _task_fits(self) -> FineTuneSpec:
        if self.task == "single_label" and self.early_stopping.monitor == "val_map":
            raise ValueError("early_stopping.monitor val_map is for multi-label jobs")
        if self.task == "multi_label" and self.pseudo_labels.rounds > 0:
            raise ValueError(MULTI_LABEL_PSEUDO)
        return self

    @model_validator(mode="after")
    def _refit_needs_cached_head(self) -> FineTuneSpec:
        if self.refit is True and not (self.head_alone and self.augment in ("auto", "none")):
            raise ValueError(
                "refit: true needs the head trained alone on cached features "
                "(freeze.strategy head_only, or auto with preset fast; augment none)")
        return self


# Said at submit too, where the task comes from the dataset (task auto).
MULTI_LABEL_PSEUDO = ("pseudo_labels: a pseudo-label is the one class a model is sure of, and "
                      "multi-label jobs have no one class; set pseudo_labels.rounds to 0 (pretrain "
                      "works for both tasks)")


class SpecError(ValueError):
    """A spec that does not validate; the message names each bad field."""


def parse_spec(data: dict | str | bytes | None) -> FineTuneSpec:
    """Validate a spec given as a dict or JSON text; raise SpecError naming the bad fields."""
    try:
        if data is None:
            return FineTuneSpec()
        if isinstance(data, (str, bytes)):
            return FineTuneSpec.model_validate_json(data)
        return FineTuneSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc)) from exc


def format_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "spec"
        parts.append(f"{field}: {err['msg'].removeprefix('Value error, ')}")
    return "invalid spec: " + "; ".join(parts)
