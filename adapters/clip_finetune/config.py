"""Every hyperparameter in one pydantic model: defaults, bounds and descriptions live here only.

Precedence, said once: CLI `--set` flags > `--config` file / model configuration > these defaults.
The Dataloop manifest's model configuration, the CLI and docs/configuration.md are checked against
this model in the tests.
"""

from __future__ import annotations

import difflib
import json
import re
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .architecture import (
    _artifact_model_config,
    architecture_config,
    check_pretrained_tag,
    normalize_model_name,
)
from .errors import ConfigError
from .sections import DataSection, ModelSection, OptimisationSection, RuntimeSection, SelectionSection, section_of

# Metric names the early-stopping / best-checkpoint selection may use (see metrics.py for formulas).
DIRECTIONS = ("text_to_image", "image_to_text")
RANK_METRICS = ("mrr", "map", "r_precision")
AT_K_METRICS = ("recall", "precision", "hit", "f1", "ndcg")
EVAL_KS = (1, 5, 10)
# CLIP's zero-shot prompts (Radford et al. 2021, ImageNet prompt ensemble): the first makes the training captions
# of labelled images, all of them are averaged into each class's embedding for zero-shot classification.
DEFAULT_LABEL_TEMPLATES = (
    "a photo of a {label}.",
    "a good photo of a {label}.",
    "a close-up photo of the {label}.",
    "a cropped photo of the {label}.",
    "a bright photo of a {label}.",
)


# the device types torch.device accepts (torch 2.x's c10 DeviceType names), optionally with an index
TORCH_DEVICE = re.compile(r"(cpu|cuda|mps|xpu|xla|meta|hpu|mtia|ipu|ve|fpga|maia|opengl|opencl|ideep|hip|lazy|vulkan"
                          r"|privateuseone)(:(0|[1-9][0-9]*))?")


def metric_names(ks: tuple[int, ...] = EVAL_KS) -> list[str]:
    """All flat metric keys, e.g. 'text_to_image/recall@1', 'image_to_text/mrr'."""
    names = []
    for d in DIRECTIONS:
        names += [f"{d}/{m}@{k}" for m in AT_K_METRICS for k in ks]
        names += [f"{d}/{m}" for m in (*RANK_METRICS, "median_rank", "mean_rank")]
    return names


class FinetuneConfig(BaseModel):
    """Hyperparameters of a fine-tuning run, an evaluation and an embedding job."""

    # allow_inf_nan=False: a NaN learning rate is "not a finite number", not "should be <= 1 (got nan)"
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)

    # --- model -------------------------------------------------------------------------------
    model_name: str = Field(
        "ViT-B-32",
        description="open_clip architecture name ('ViT-B/32' spelling accepted) or the path of an "
        "open_clip model-config JSON (custom architecture)",
    )
    pretrained: str | None = Field(
        "openai",
        description="open_clip pretrained tag, a saved artifact folder, or null/'none' for random init",
    )
    embeddings_size: int | None = Field(
        None, gt=0, description="vector length; derived from the architecture, an explicit mismatch is an error"
    )

    # --- optimisation (published recipes: docs/configuration.md, "Where the defaults come from") ---
    train_batch_size: int = Field(64, ge=2, le=65536, description="image-caption pairs per training step")
    num_epochs: int = Field(5, ge=1, le=1000, description="passes over the training subset")
    max_steps: int | None = Field(
        None, ge=1, description="stop after this many optimisation steps (the last epoch is cut short, then "
        "validated as any other; the schedule ends there); null: num_epochs decides"
    )
    learning_rate: float = Field(1e-6, gt=0, le=1.0, description="peak AdamW learning rate")
    betas: tuple[float, float] = Field((0.9, 0.98), description="AdamW betas, each in [0, 1)")
    epsilon: float = Field(1e-6, gt=0, le=1.0, description="AdamW epsilon")
    weight_decay: float = Field(
        0.1, ge=0, le=10.0, description="AdamW weight decay (not applied to gains, biases, logit scale)"
    )
    warmup: float = Field(
        0.1, ge=0, description="linear warmup: a fraction of all steps if < 1, else a number of steps"
    )
    lr_schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="learning-rate decay after warmup"
    )
    grad_clip_norm: float | None = Field(1.0, gt=0, description="clip gradients to this L2 norm; null: off")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 autocast on CUDA compute capability >= 8 (A100, L4, H100), fp16 with loss "
        "scaling below (T4, V100); on a CPU, bf16 autocast for training where it trained measurably faster (CPUs "
        "with AMX bf16 units, models at least as wide as ViT-B-32; docs/performance.md), else fp32; bf16 asked on "
        "a GPU below 8 runs fp16; embedding and evaluation on a CPU always run fp32"
    )
    duplicate_aware_loss: bool = Field(
        True, description="pairs of a batch that share an image (same file content) or a caption (normalised) are "
        "not negatives of each other: masked out of the softmax (SigLIP: counted as positives); false: open_clip's "
        "plain loss (docs/data.md has the measurement)"
    )
    unique_batches: bool = Field(
        False, description="fill each batch with pairs of distinct images and captions where the data allows "
        "(the rest of a batch is filled with the remaining pairs)"
    )
    hard_negatives: int = Field(0, ge=0, le=64, description="hard-negative batches: each epoch the model embeds "
                                "the training data and each caption shares its batch with the N images it ranks "
                                "highest among those that do not match it (duplicate-aware); 0: off. Costs an "
                                "embedding pass per epoch (docs/data.md has the measurement)")
    compile: bool = Field(
        False, description="torch.compile the model for training (and the `embed` command): faster steps after a "
        "one-off compile of tens of seconds; where it cannot compile, a warning says why and the model runs "
        "uncompiled"
    )

    # --- what trains, and memory (docs/scale.md) ------------------------------------------------
    lock_image: bool = Field(False, description="freeze the image tower (LiT); see lock_image_unlocked_groups")
    lock_image_unlocked_groups: int = Field(
        0, ge=0, description="with lock_image: leave the last N layer groups of the image tower trainable "
        "(open_clip's groups: 1 = the projection, 2 = also the last block and final norm, ...)"
    )
    lock_text: bool = Field(False, description="freeze the text tower; see lock_text_unlocked_layers")
    lock_text_unlocked_layers: int = Field(
        0, ge=0, description="with lock_text: leave the last N layer groups of the text tower trainable "
        "(1 = the projection, 2 = also the last block and final norm, ...; Hugging Face towers: the last N "
        "transformer layers, their projection always trains)"
    )
    grad_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass: less memory, ~30% slower steps"
    )
    accum_freq: int = Field(
        1, ge=1, le=1024, description="split each step of train_batch_size pairs into this many micro-batches; "
        "their features are cached so the contrastive loss still sees the whole batch (less memory, same result)"
    )
    num_processes: int | None = Field(
        None, ge=1, le=1024, description="DDP training processes on this machine (torchrun); null: one per "
        "visible GPU, one on a CPU; train_batch_size is the global batch, split across them"
    )
    wise_ft_alpha: float = Field(
        1.0, ge=0.0, le=1.0, description="WiSE-FT: saved weights = alpha * fine-tuned + (1 - alpha) * base "
        "(1: fine-tuned only; 0.5 often keeps more zero-shot skill)"
    )
    wise_ft_auto: bool = Field(True, description="after training, ship the WiSE-FT alpha of 0, 0.1, ..., 1 best "
                               "on validation whose retention set falls at most retention_tolerance below the base "
                               "model's; a wise_ft_alpha below 1 wins (docs/retention.md)")
    retention_tolerance: float = Field(0.01, ge=0.0, le=1.0, description="how far the retention set's "
                                       "early_stopping_metric (ranked in galleries of 1,000 images) may fall below the "
                                       "base model's (0.01: one point of MRR), for auto WiSE-FT and the promotion gate")
    export_onnx: bool = Field(False, description="also export the image and text towers to ONNX (onnx/ inside the "
                              "saved model)")

    # --- data: held-out split, leakage, labels (docs/data.md) ----------------------------------
    holdout_fraction: float = Field(
        0.1, ge=0.0, le=0.5, description="with no validation data: hold out this fraction of the training pairs "
        "(seeded, whole groups of pairs sharing an image or a caption) to pick the best epoch; 0: off"
    )
    holdout_max_pairs: int = Field(
        2000, ge=2, le=1_000_000, description="at most this many held-out pairs (evaluation runs every epoch)"
    )
    drop_train_overlap: bool = Field(
        True, description="drop validation and test pairs whose item id, image path or image content is also in "
        "train (counted in data_report.json); false: keep them, with the warning"
    )
    leakage_picture_distance: int | None = Field(
        None, ge=0, le=32, description="also count a validation or test image as in train when its perceptual hash "
        "is within this many of 64 bits of a train image's: the same picture re-encoded or resized (4: docs/data.md "
        "has the measured matches); null: by bytes only; needs pip install imagehash"
    )
    image_column: str | None = Field(
        None, description="the image-path column of a CSV/TSV/JSONL table; null: filepath, image, path, ..."
    )
    caption_column: str | None = Field(None, description="the caption column of a table; null: caption, text, ...")
    label_templates: list[str] = Field(
        list(DEFAULT_LABEL_TEMPLATES), min_length=1, max_length=100, description="captions of labelled images "
        "without a description: the first template makes the training caption, all of them are averaged for "
        "zero-shot classification; each holds {label}"
    )

    # --- validation, best checkpoint, early stopping -------------------------------------------
    early_stopping: bool = Field(True, description="stop when the validation metric stops improving")
    early_stopping_epochs: int = Field(2, ge=1, le=1000, description="epochs without improvement before stopping")
    early_stopping_metric: str = Field(
        "text_to_image/mrr",
        description="validation metric that picks the best epoch and drives early stopping (higher is better)",
    )

    # --- reliability ---------------------------------------------------------------------------
    checkpoint_every_steps: int = Field(
        1000, ge=0, description="also write the resume checkpoint every N steps within an epoch (0: epoch ends only)"
    )
    max_bad_steps: int = Field(
        20, ge=1, le=100000, description="consecutive steps with a non-finite loss or gradients before the run stops"
    )
    max_image_pixels: int | None = Field(
        89_478_485, ge=1, description="refuse images larger than this many pixels (decompression bombs); null: off"
    )

    # --- runtime -------------------------------------------------------------------------------
    batch_size: int = Field(64, ge=1, le=65536, description="items per batch when embedding and evaluating")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="random seed (runs on CPU are deterministic under it)")
    num_workers: int | None = Field(
        None, ge=0, le=64, description="data-loading worker processes; null: fit the machine's cores"
    )
    device: str | None = Field(None, description="torch device; null: cuda if available, else cpu")
    image_cache_mb: int = Field(
        2048, ge=0, description="memory for images decoded once and kept across epochs (uint8): the validation "
        "images, preprocessed, first; then the training images (short side 1.25x the model input); images past "
        "it are decoded each time; 0: off; the training images are not kept with num_workers > 0"
    )
    tracking: Literal["none", "mlflow", "wandb"] = Field(
        "none", description="log the configuration, every epoch's metrics, the before/after table and the saved "
        "model to an experiment tracker: mlflow (MLFLOW_TRACKING_URI, else a local mlflow.db and ./mlruns) or wandb "
        "(offline without WANDB_API_KEY); needs the mlflow or wandb extra"
    )
    base_eval_cache: bool = Field(
        True, description="keep the base model's validation embeddings on disk ($CLIP_FINETUNE_CACHE, else "
        "~/.cache/clip-finetune), keyed by a hash of the weights, images, captions and settings: a rerun from "
        "the same base model on the same data reads its 'before' evaluation instead of computing it"
    )

    # --- the sections the engine's functions take (sections.py): views of the flat keys above -------------
    @property
    def model(self) -> ModelSection:
        return section_of(self, ModelSection)

    @property
    def optimisation(self) -> OptimisationSection:
        return section_of(self, OptimisationSection)

    @property
    def data(self) -> DataSection:
        return section_of(self, DataSection)

    @property
    def selection(self) -> SelectionSection:
        return section_of(self, SelectionSection)

    @property
    def runtime(self) -> RuntimeSection:
        return section_of(self, RuntimeSection)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads true as 1: `--set num_epochs=true` would train one epoch
        if cls.model_fields[info.field_name].annotation is not bool and _holds_bool(v):
            raise ValueError(f"expected {'numbers' if isinstance(v, list | tuple) else 'a number'}, not true/false "
                             f"(got {json.dumps(v, default=str)})")
        return v

    @field_validator("device")
    @classmethod
    def _torch_device(cls, v: str | None) -> str | None:
        # torch.device's own grammar, checked without importing torch: validation stays light and does no I/O
        if v is not None and not TORCH_DEVICE.fullmatch(v):
            raise ValueError("unknown torch device; use cpu, cuda, cuda:N, mps, or null (automatic)")
        return v

    @field_validator("model_name")
    @classmethod
    def _normalize_name(cls, v: str) -> str:
        return normalize_model_name(v)

    @field_validator("pretrained", mode="before")
    @classmethod
    def _none_tag(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().lower() in ("", "none", "null", "random"):
            return None
        return v

    @field_validator("betas")
    @classmethod
    def _betas_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"each beta must be in [0, 1) (got {list(v)})")
        return v

    @field_validator("warmup")
    @classmethod
    def _warmup_steps_whole(cls, v: float) -> float:
        if v >= 1 and v != int(v):
            raise ValueError(f"a warmup of 1 or more is a number of steps and must be whole (got {v})")
        return v

    @field_validator("label_templates")
    @classmethod
    def _templates_name_the_label(cls, v: list[str]) -> list[str]:
        for t in v:
            # parsed, never formatted here: '{label:>9999999999}' would build a 10 GB string, '{label.__class__}'
            # reads attributes; only a bare {label} (no attribute, index, conversion or format spec) is allowed
            try:
                fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(t)
                          if name is not None]
            except ValueError as e:
                raise ValueError(f"template {t!r} may only hold {{label}} ({e}); write a literal brace as {{{{ or "
                                 "}}") from None
            odd = next((f for f in fields if f != ("label", "", None)), None)
            if odd is not None:
                shown = "{" + odd[0] + (f"!{odd[2]}" if odd[2] else "") + (f":{odd[1]}" if odd[1] else "") + "}"
                raise ValueError(f"template {t!r} may only hold {{label}}, with no format, attribute or index "
                                 f"(found {shown[:60]!r})")
            if not fields:
                raise ValueError(f"template {t!r} does not hold {{label}}")
        return v

    @field_validator("early_stopping_metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        if v not in metric_names():
            if v in ("text_to_image/median_rank", "image_to_text/median_rank") or v.endswith("mean_rank"):
                raise ValueError(f"{v!r} is lower-is-better; pick a higher-is-better metric")
            close = difflib.get_close_matches(v, metric_names(), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            valid = [m for m in metric_names() if not m.endswith("_rank")]
            raise ValueError(f"unknown metric {v!r}{hint}; valid (higher is better): {', '.join(valid)}")
        return v

    @model_validator(mode="after")
    def _micro_batches_divide(self) -> FinetuneConfig:
        if self.train_batch_size % self.accum_freq:
            raise ValueError(f"accum_freq: {self.accum_freq} does not divide train_batch_size {self.train_batch_size}")
        return self

    @model_validator(mode="after")
    def _derive_embeddings_size(self, info: ValidationInfo) -> FinetuneConfig:
        if (info.context or {}).get("saved_model") and self.model_name.endswith(".json") and not Path(
            self.model_name
        ).expanduser().is_file():
            # a trained model loads its architecture from its own artifact: the config JSON it was built from
            # may live on another machine (embeddings_size comes from the artifact when it loads)
            return self
        arch = _artifact_model_config(self.pretrained) or architecture_config(self.model_name)
        check_pretrained_tag(self.model_name, self.pretrained)
        size = int(arch["embed_dim"])
        if self.embeddings_size is None:
            # object.__setattr__: plain assignment would re-run this validator (validate_assignment)
            object.__setattr__(self, "embeddings_size", size)
        elif self.embeddings_size != size:
            raise ValueError(
                f"embeddings_size: {self.embeddings_size} contradicts {self.model_name!r}, "
                f"whose embeddings have {size} dimensions; remove the key or set it to {size}"
            )
        return self


FIELDS = tuple(FinetuneConfig.model_fields)


def _holds_bool(v: Any) -> bool:
    return isinstance(v, bool) or (isinstance(v, list | tuple) and any(isinstance(x, bool) for x in v))


def _format_error(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "config"
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(err["loc"][0]), FIELDS, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(FIELDS)}"
        return f"{loc}: unknown key{hint}"
    msg = err["msg"].removeprefix("Value error, ")
    if not err["loc"]:  # a check across fields names its keys itself
        return msg
    if err["type"] == "value_error" and "(got" in msg:
        return f"{loc}: {msg}" if not msg.startswith(loc) else msg
    return f"{loc}: {msg} (got {err.get('input')!r})"


def build_config(*layers: Mapping[str, Any] | None, saved_model: bool = False) -> FinetuneConfig:
    """Merge configuration layers (later wins) and validate once.

    `saved_model`: the configuration of a model that has saved weights (which hold its architecture): a
    model_name config JSON missing on this machine is then not an error.
    Raises ConfigError listing every bad field, one line each, before any work is done.
    """
    merged: dict[str, Any] = {}
    for layer in layers:
        if layer:
            merged.update(layer)
    try:
        return FinetuneConfig.model_validate(merged, context={"saved_model": saved_model})
    except ValidationError as e:
        lines = [_format_error(err) for err in e.errors()]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
    except ConfigError as e:
        raise ConfigError(f"invalid configuration:\n  {e}") from None
