"""ClipAdapter: the Dataloop model adapter. The only module that imports dtlpy; it translates between platform
entities (models, items, datasets, artifacts, feature sets, metrics) and core calls (config, data, model, train,
evaluate, embed).

dtlpy's runner loads this file by path (dataloop.json `entryPoint`), without registering it in sys.modules:
imports are absolute and no @dataclass is defined here. The SDK traps worked around are noted where they matter.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import dtlpy as dl
import numpy as np
import torch
from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME
from PIL import Image

from adapters.clip_finetune.config import DIRECTIONS, EVAL_KS, FinetuneConfig, build_config
from adapters.clip_finetune.data.dataloop import ImageResolver, image_ref, prompt_parts, read_subset
from adapters.clip_finetune.data.images import ImageDecodeError, load_image, set_max_image_pixels
from adapters.clip_finetune.data.pairs import CaptionPair, DataReport
from adapters.clip_finetune.errors import ConfigError, DataError, ModelError
from adapters.clip_finetune.model.clip import (
    FINETUNE_CONFIG_NAME,
    METRICS_NAME,
    ClipModel,
    is_artifact_dir,
    load_artifact,
    load_model,
    save_artifact,
)
from adapters.clip_finetune.retrieval.embed import encode_image_tensors, encode_texts
from adapters.clip_finetune.retrieval.evaluate import evaluate as retrieval_metrics
from adapters.clip_finetune.retrieval.metrics import format_table
from adapters.clip_finetune.training.loop import CHECKPOINT_NAME, TrainResult, fit

logger = logging.getLogger(__name__)

# Keys dtlpy keeps in a model's configuration for itself: AdapterDefaults' fields, and the keys its wrappers
# read with configuration.get(key, default), which writes the default through to the platform. They are not
# hyperparameters, so they are dropped before validation (anything else unknown is a typo and rejected).
# batch_size and embeddings_size are read by dtlpy AND are ours: they are validated, and kept in agreement.
DTLPY_CONFIG_KEYS = frozenset({
    "include_background", "include_model_annotations", "column",  # prepare_data / prepare_item_func
    "upload_annotations", "clean_annotations", "overwrite_annotations",  # predict / evaluate
    "upload_features", "predict_embed_subset_limit", "predict_embed_timeout",  # embed
    "root_path", "data_path", "output_path",  # train_model's working folders
    "id_to_label_map", "label_to_id_map",  # dl.Model label maps (classification models)
})
TRAIN_SUBSETS = ("train", "validation")
# what a restarted run needs: the resume checkpoint and the best-so-far artifact (uploaded as they change)
RUN_STATE_FILES = (CHECKPOINT_NAME, HF_SAFE_WEIGHTS_NAME, HF_CONFIG_NAME, FINETUNE_CONFIG_NAME, METRICS_NAME)
REQUIRED_ARTIFACTS = (HF_SAFE_WEIGHTS_NAME, HF_CONFIG_NAME)  # what stock open_clip needs to load the model
DATA_REPORT_NAME = "data_report.json"  # uploaded with the artifacts: what each subset used and skipped
PROMPT_IMAGES = ".prompt-images"  # beside the subset folders; the dot keeps it out of the subset scan
FETCH_THREADS = 16  # as dtlpy's own download pools
PUBLISHED_METRICS = ("recall@1", "recall@5", "recall@10", "mrr")
VECTORS = "/features/vectors"  # the platform's feature vector route, for messages
STORED_QUERY_CHUNK = 500  # item ids per query for the vectors a feature set already holds
LISTED_IN_LOGS = 20  # bad items named one by one in an embedding job's warning; the rest are counted
_ITEM_ID = re.compile(r"[0-9a-fA-F]{24}")
# What a failed platform call raises. Not PlatformException: its constructor raises a subclass of ExceptionMain
# (NotFound, InternalServerError, ...) in its place. Connection errors and timeouts (requests) are OSErrors.
PLATFORM_ERRORS = (dl.exceptions.ExceptionMain, dl.exceptions.PlatformException, OSError)
_DECODE_PREFIX = re.compile(r"^cannot decode image '.*?': ")  # images.load_image's message starts with the path


class Unusable(NamedTuple):
    """What prepare_item_func returns for an item it cannot turn into model input; embed() yields None for it.

    `reason` is the category counted in embed_report, `detail` says what exactly is wrong with the file.
    A `transient` failure (a download that failed) is not the item's fault: embed_items fails the job for it,
    since a re-run can store the vector, whereas a bad item is skipped and listed.
    (A NamedTuple, not a dataclass: dtlpy loads this file without registering it in sys.modules, where
    @dataclass looks up string annotations.)
    """

    item_id: str
    reason: str
    detail: str = ""
    transient: bool = False

    def describe(self) -> str:
        return f"{self.item_id} ({self.reason}{': ' + self.detail if self.detail else ''})"


class _Unusable(Exception):
    """Internal: an item cannot be embedded; the message is the reason (counted in embed_report)."""

    def __init__(self, reason: str, transient: bool = False) -> None:
        super().__init__(reason)
        self.transient = transient


class VectorUploadError(ModelError):
    """Some of an embedding job's vectors were not stored in the model's feature set; a re-run stores them."""


PreparedItem = torch.Tensor | str | Unusable | None  # image tensor [3, H, W] | text | why not


class ClipAdapter(dl.BaseModelAdapter):
    """Fine-tune, evaluate and embed with open_clip models on the Dataloop platform."""

    def __init__(self, model_entity: dl.Model | None = None) -> None:
        self.cfg: FinetuneConfig | None = None
        self.clip: ClipModel | None = None
        self.result: TrainResult | None = None
        self.data_reports: dict[str, DataReport] = {}  # per subset, from the last data read
        self.embed_report = DataReport()  # items embedded and skipped (with why) since the adapter was built
        # A deployed service runs several executions at once on this one adapter: embed() is called from many
        # threads. Inference itself is safe (eval mode, inference_mode); the shared report and the tokenizer
        # (Hugging Face fast tokenizers raise "Already borrowed" when called concurrently) are not.
        self._report_lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()
        self.evaluation: dict[str, float] = {}
        self._pairs: dict[str, list[CaptionPair]] = {}
        self._pairs_root: Path | None = None
        self._trained_dir: Path | None = None
        self._artifacts_dir: Path | None = None  # where load_from_model put the model's artifacts
        self._uploaded: dict[str, int] = {}  # run-state file -> mtime_ns of its last upload
        self._failed = False  # training failed: nothing trained to save or upload
        self._cfg_model_id: str | None = None  # the model self.cfg was validated for
        super().__init__(model_entity=model_entity)  # calls load_from_model when given a model

    # --- configuration and weights ---------------------------------------------------------------------

    def load_from_model(
        self, model_entity: dl.Model | None = None, local_path: str | None = None, overwrite: bool = True, **kwargs: Any
    ) -> None:
        """Validate the model's configuration first, so a bad key fails before dtlpy downloads anything."""
        self._validate_config(model_entity if model_entity is not None else self.model_entity)
        super().load_from_model(model_entity=model_entity, local_path=local_path, overwrite=overwrite, **kwargs)

    def load(self, local_path: str, **kwargs: Any) -> None:
        """The saved artifact in `local_path` (a trained model), else the configured base model."""
        if self._cfg_model_id != self.model_entity.id:  # load() called without load_from_model
            self._validate_config(self.model_entity)
        self._artifacts_dir = Path(local_path)
        if is_artifact_dir(local_path):
            self.clip = load_artifact(local_path, self.cfg.device)
        else:
            self.clip = load_model(self.cfg)
        self.model = self.clip.model
        self._sync_embedding_keys()

    def _validate_config(self, model: dl.Model) -> None:
        self.cfg = config_from_model(model)
        self._cfg_model_id = model.id
        set_max_image_pixels(self.cfg.max_image_pixels)  # decoding in embed/evaluate honours the limit too

    def _sync_embedding_keys(self) -> None:
        """Make the two keys dtlpy's embed wrappers read agree with the loaded model, in one explicit update.

        dtlpy creates the feature set with configuration['embeddings_size'] (default 256) and silently drops
        vectors of any other length; it embeds configuration['batch_size'] items at a time (default 4).
        """
        config = self.model_entity.configuration  # the raw dict: dict.get here writes nothing back
        size = self.clip.embed_dim
        if config.get("embeddings_size") not in (None, size):
            raise ConfigError(
                f"invalid configuration:\n  embeddings_size: {config['embeddings_size']} contradicts the loaded "
                f"model ({self.clip.source}), whose embeddings have {size} dimensions; remove the key or set it "
                f"to {size}"
            )
        changes = {k: v for k, v in {"embeddings_size": size, "batch_size": self.cfg.batch_size}.items()
                   if config.get(k) != v}
        if changes:
            logger.info("model %r: setting %s in its configuration for dtlpy's embedding", self.model_entity.name,
                        changes)
            config.update(changes)
            self.model_entity.update(reload_services=False)

    def save(self, local_path: str, **kwargs: Any) -> None:
        """Write the weights in memory (after train(): the best epoch's) as an open_clip local-dir artifact."""
        if self._failed:
            logger.warning("training failed: not saving the untrained weights to %s", local_path)
            return
        if self._trained_dir == Path(local_path).resolve() and is_artifact_dir(local_path):
            return  # train() already wrote the best epoch there (fit saves it); rewriting would only cost time
        save_artifact(self.clip, local_path, self.cfg, self.result.to_dict() if self.result else None)

    def save_to_model(
        self, local_path: str | None = None, cleanup: bool = False, replace: bool = True, **kwargs: Any
    ) -> None:
        """dtlpy's save + upload, then a check that the weights really reached the model: dtlpy only logs a
        failed upload, and the model would end 'trained' without weights."""
        if self._failed:
            # dtlpy's train_model calls this again after an exception; fit leaves no partial checkpoint, and
            # uploading the base weights would pass them off as trained ones.
            logger.warning("training failed: not uploading %s", local_path)
            return
        local_path = local_path or tempfile.mkdtemp(prefix=f"model_{self.model_entity.name}")
        self._drop_checkpoint_artifact()
        super().save_to_model(local_path=local_path, cleanup=False, replace=replace, **kwargs)
        try:
            self._check_artifacts(Path(local_path))
        except ModelError:
            self._failed = True
            raise
        if cleanup:
            shutil.rmtree(local_path, ignore_errors=True)

    def _drop_checkpoint_artifact(self) -> None:
        """The run is complete: remove its resume checkpoint (~3x the model) from the artifacts, before dtlpy's
        upload re-lists them, so a later train_model continues training instead of resuming a finished run."""
        if CHECKPOINT_NAME not in self._uploaded:
            return
        try:
            self.model_entity.artifacts.delete(artifact_name=CHECKPOINT_NAME)
        except PLATFORM_ERRORS as e:
            logger.warning("could not delete the finished run's %s artifact: %s", CHECKPOINT_NAME, e)

    def _check_artifacts(self, local: Path) -> None:
        """Raise ModelError unless the model, read back from the platform, references every file of the folder
        dtlpy uploaded (the required ones first) at the size written locally (a same-named model's stale files
        would not match)."""
        model = dl.models.get(model_id=self.model_entity.id)
        referenced = {a.id for a in model.model_artifacts}
        uploaded = {a.name: a for a in model.artifacts.list() if a.id in referenced}
        others = sorted(p.name for p in local.iterdir() if p.is_file() and p.name not in REQUIRED_ARTIFACTS)
        files = [*REQUIRED_ARTIFACTS, *others]
        missing = [n for n in files if n not in uploaded or _item_size(uploaded[n]) != (local / n).stat().st_size]
        if missing:
            required = [m for m in missing if m in REQUIRED_ARTIFACTS]
            rest = [m for m in missing if m not in REQUIRED_ARTIFACTS]
            what = f"{', '.join(required or rest)} did not reach the platform"
            if required and rest:
                what += f", nor did {', '.join(rest)}"
            raise ModelError(
                f"model {model.name!r} ({model.id}): {len(missing)} of {len(files)} artifact files were not stored: "
                f"{what} (the upload failed; see the dtlpy errors above); its artifacts are "
                f"{sorted(uploaded) or 'none'}. Re-run training, or upload the folder {str(local.resolve())!r} with "
                "model.artifacts.upload(...)"
            )

    # --- training data ----------------------------------------------------------------------------------

    def convert_from_dtlpy(self, data_path: str, **kwargs: Any) -> None:
        """Read and check the downloaded subsets (prepare_data calls this right after downloading), so a subset
        with no usable pairs fails here, before training starts."""
        self._pairs = self._read_subsets(Path(data_path))
        self._pairs_root = Path(data_path).resolve()

    def _read_subsets(self, root: Path) -> dict[str, list[CaptionPair]]:
        """{subset: pairs} of train (required) and validation (optional); DataError for an empty one."""
        resolver = item_resolver(root / PROMPT_IMAGES)
        pairs: dict[str, list[CaptionPair]] = {}
        self.data_reports = {}
        for name in TRAIN_SUBSETS:
            folder = root / name
            if not folder.is_dir():
                continue
            report = self.data_reports[name] = DataReport()
            pairs[name] = read_subset(folder, resolver, report)
            logger.log(logging.WARNING if report.total_skipped else logging.INFO, "%s: %s", name, report.summary())
            if not pairs[name]:
                raise DataError(_empty_subset_message(name, folder, report))
        if "train" not in pairs:
            found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
            raise DataError(f"no 'train' subset was downloaded to {str(root)!r} (found {found}); define "
                            "metadata.system.subsets.train on the model")
        return pairs

    # --- training ---------------------------------------------------------------------------------------

    def train(self, data_path: str, output_path: str, **kwargs: Any) -> None:
        """Fine-tune on <data_path>/train; <data_path>/validation picks the best epoch. The best epoch's weights
        stay in memory and are written to output_path (open_clip artifact + metrics.json + data_report.json)."""
        self._failed = True  # until fit returns: dtlpy's failure path must not upload the base weights
        if self._pairs_root != Path(data_path).resolve():
            self.convert_from_dtlpy(data_path)
        self.result = fit(
            self.cfg,
            self._pairs["train"],
            self._pairs.get("validation"),
            out_dir=output_path,
            on_epoch_end=self._epoch_reporter(kwargs.get("on_epoch_end_callback")),
            clip=self.clip,
            resume=self._stage_checkpoint(Path(output_path)),
            on_checkpoint=self._upload_run_state,
        )
        publish(self.model_entity, plot_samples(0, self.result.before))  # the base model, at epoch 0
        report = {name: r.to_dict() for name, r in self.data_reports.items()}
        (Path(output_path) / DATA_REPORT_NAME).write_text(json.dumps(report, indent=2))
        self._trained_dir = Path(output_path).resolve()
        self._failed = False
        logger.info("best epoch %d; validation before/after:\n%s", self.result.best_epoch,
                    format_table(self.result.before, self.result.after) if self.result.before else "(none)")

    def _stage_checkpoint(self, output: Path) -> bool:
        """A preempted or restarted run left its checkpoint (and best-so-far weights) in the model's artifacts:
        put them where fit() resumes from. False when there is none (a fresh run)."""
        source = self._artifacts_dir
        if source is None or not (source / CHECKPOINT_NAME).is_file():
            return False
        # the download folder is keyed by model NAME: a same-named model's stale checkpoint is not ours
        if CHECKPOINT_NAME not in {a.name for a in self.model_entity.artifacts.list()}:
            logger.warning("ignoring %s in %s: not an artifact of model %s", CHECKPOINT_NAME, source,
                           self.model_entity.id)
            return False
        output.mkdir(parents=True, exist_ok=True)
        for name in RUN_STATE_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, output / name)
        logger.info("model %r has a checkpoint from an interrupted run: resuming it", self.model_entity.name)
        return True

    def _upload_run_state(self, checkpoint: Path) -> None:
        """Upload the checkpoint fit() just wrote, and the best-so-far weights when they changed, so a preempted
        or restarted service resumes instead of starting over. A failure is logged: training goes on."""
        for name in RUN_STATE_FILES:
            path = checkpoint.parent / name
            if not path.is_file() or self._uploaded.get(name) == path.stat().st_mtime_ns:
                continue
            try:
                self.model_entity.artifacts.upload(filepath=str(path), overwrite=True)
                self._uploaded[name] = path.stat().st_mtime_ns
            except PLATFORM_ERRORS as e:
                logger.warning("could not upload %s (a restart would resume from an older state): %s", name, e)

    def _epoch_reporter(self, progress: Callable[[int, int], None] | None) -> Callable[[int, dict[str, float]], None]:
        def on_epoch_end(epoch: int, record: dict[str, float]) -> None:
            if progress is not None:
                progress(epoch - 1, self.cfg.num_epochs)  # dtlpy's callback counts epochs from 0
            publish(self.model_entity, plot_samples(epoch, record))

        return on_epoch_end

    # --- embedding --------------------------------------------------------------------------------------

    def prepare_item_func(self, item: dl.Item) -> PreparedItem:
        """Runs in dtlpy's thread pool, so embed() does model work only: an image item becomes a preprocessed
        tensor, a text item its text, a prompt item its image (fetched by id) or, without one, its text."""
        try:
            if is_prompt_item(item):
                return self._prompt_input(item)
            if (item.mimetype or "").startswith("text/"):
                return download_bytes(item).decode("utf-8", "replace").strip()
            if not (item.mimetype or "").startswith("image/"):
                raise _Unusable(f"unsupported mimetype {item.mimetype!r}")
            return self.clip.preprocess(decode_image(download_bytes(item), item.name))
        except _Unusable as e:
            return Unusable(item.id, str(e), transient=e.transient)
        except ImageDecodeError as e:
            return Unusable(item.id, "undecodable image", decode_detail(e))
        except dl.exceptions.NotFound:  # a prompt's image item was deleted: no re-run will find it
            return Unusable(item.id, "prompt image not found")
        except PLATFORM_ERRORS as e:
            return Unusable(item.id, f"download failed ({type(e).__name__})", transient=True)

    def _prompt_input(self, item: dl.Item) -> torch.Tensor | str:
        """The first prompt's image (by item id), else its text."""
        try:
            content = json.loads(download_bytes(item))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _Unusable("unreadable prompt json") from None
        prompts = (content.get("prompts") if isinstance(content, dict) else None) or {}
        elements = prompts[min(prompts, key=_prompt_order)] if prompts else []
        image, text = prompt_parts(elements)
        if image is not None:
            ref = image_ref(image)
            if not _ITEM_ID.fullmatch(ref):
                raise _Unusable("prompt image is an external URL")
            image_item = dl.items.get(item_id=ref)
            return self.clip.preprocess(decode_image(download_bytes(image_item), image_item.name))
        if text:
            return text
        raise _Unusable("prompt has no image or text")

    def embed(self, batch: list[PreparedItem], **kwargs: Any) -> list[list[float] | None]:
        """One unit vector (plain floats) per entry, in order; None where the item could not be prepared."""
        vectors: list[list[float] | None] = [None] * len(batch)
        images = [i for i, x in enumerate(batch) if isinstance(x, torch.Tensor)]
        texts = [i for i, x in enumerate(batch) if isinstance(x, str) and x]
        if images:
            features = encode_image_tensors(self.clip, torch.stack([batch[i] for i in images]))
            for i, v in zip(images, unit_vectors(features), strict=True):
                vectors[i] = v
        if texts:
            clip = replace(self.clip, tokenizer=_Locked(self.clip.tokenizer, self._tokenizer_lock))
            features = encode_texts(clip, [batch[i] for i in texts], batch_size=len(texts))
            for i, v in zip(texts, unit_vectors(features), strict=True):
                vectors[i] = v
        with self._report_lock:  # `+=` on a shared counter loses updates between threads
            for x in batch:
                if isinstance(x, Unusable):
                    self.embed_report.skip(x.reason, x.item_id)
                elif not isinstance(x, torch.Tensor | str) or x == "":
                    self.embed_report.skip("nothing to embed", repr(x)[:40])
            self.embed_report.used += len(images) + len(texts)
        return vectors

    @dl.Package.decorators.function(
        display_name="Embed Items",
        inputs={"items": "Item[]"},
        outputs={"items": "Item[]", "features": "Json[]"},
    )
    def embed_items(
        self,
        items: list,
        upload_features: bool | None = None,
        batch_size: int | None = None,
        progress: Any = None,
        **kwargs: Any,
    ) -> tuple[list[dl.Item], list[list[float]]]:
        """dtlpy's embed_items (embed_dataset runs it too), made resumable and loud:

        - an item whose vector the model's feature set already holds is not embedded again (its stored vector
          is returned), so re-running a failed job completes it without duplicate vectors;
        - vectors are uploaded batch by batch; the first failed upload stops the job, which then raises
          VectorsNotStoredError with the count of vectors not stored (so does an item that failed to download);
        - an item that cannot be embedded (undecodable, unsupported) gets no vector: it is skipped, counted in
          embed_report and listed in a warning, and does not fail the job.
        As in dtlpy, prompt items are uploaded only with upload_features=True, and the return value is the
        items that have a vector and their vectors, in input order.
        """
        items = list(items) if isinstance(items, list | tuple) else [items]
        if upload_features is None:
            upload_features = self.model_entity.configuration.get("upload_features")  # the raw dict: no write
        feature_set = self.feature_set if upload_features is not False else None
        job = EmbedJob(self.model_entity, items, feature_set, upload_prompts=upload_features is True)
        todo = [item for item in items if item.id not in job.stored] if job.failure is None else []
        batch_size = batch_size or self.cfg.batch_size
        with ThreadPoolExecutor(FETCH_THREADS) as pool:
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                prepared = list(pool.map(self.prepare_item_func, batch))
                try:
                    vectors = self.embed(prepared)
                except Exception as e:  # counted, then raised as VectorsNotStoredError by job.result()
                    job.failed(f"embed() raised {type(e).__name__}: {e}", e)
                    break
                if not job.add(batch, prepared, vectors):
                    break  # the upload failed: the platform is unlikely to take the next batch
                if progress is not None:
                    progress.update(progress=int(100 * (start + len(batch)) / len(todo)),
                                    message=f"embedded {start + len(batch)}/{len(todo)} items")
        return job.result()

    # --- evaluation -------------------------------------------------------------------------------------

    @dl.Package.decorators.function(
        display_name="Evaluate a Model",
        inputs={"model": dl.Model, "dataset": dl.Dataset, "filters": "Json"},
        outputs={"model": dl.Model, "dataset": dl.Dataset},
    )
    def evaluate_model(
        self,
        model: dl.Model,
        dataset: dl.Dataset,
        filters: dl.Filters | dict | None = None,
        progress: Any = None,
        context: Any = None,
    ) -> tuple[dl.Model, dl.Dataset]:
        """dtlpy's evaluate_model without its predict step (it would download every item to make annotations
        an embedding model does not have): load the model, then evaluate()."""
        if self._model_entity is None or self._model_entity.id != model.id or self.clip is None:
            self.load_from_model(model_entity=model)
        if progress is not None:
            progress.update(message="calculating retrieval metrics", progress=50)
        return self.evaluate(model=model, dataset=dataset, filters=filters), dataset

    def evaluate(
        self, model: dl.Model, dataset: dl.Dataset, filters: dl.Filters | dict | None = None, **kwargs: Any
    ) -> dl.Model:
        """Retrieval metrics (both directions) of the loaded model on the captioned items `filters` selects,
        published to `model`; replaces dtlpy's scoring of box/class/polygon annotations."""
        with tempfile.TemporaryDirectory(prefix="clip-evaluate-") as tmp:
            folder = Path(tmp) / "evaluation"
            list(dataset.items.download(filters=as_filters(filters), local_path=str(folder),
                                        annotation_options=dl.ViewAnnotationOptions.JSON))  # a lazy generator
            report = self.data_reports["evaluation"] = DataReport()
            pairs = read_subset(folder, item_resolver(Path(tmp) / PROMPT_IMAGES), report) if folder.is_dir() else []
            if not pairs:
                raise DataError(_empty_subset_message(f"dataset {dataset.name!r}", folder, report))
            self.evaluation = retrieval_metrics(self.clip, pairs, self.cfg.batch_size, self.cfg.num_workers)
        logger.info("evaluation on %s (%s):\n%s", dataset.name, report.summary(), format_table(self.evaluation))
        publish(model, evaluation_samples(self.evaluation, dataset.name), dataset.id)
        return model


# --- helpers -------------------------------------------------------------------------------------------


def hyperparameters(configuration: Mapping[str, Any] | None) -> dict[str, Any]:
    """A model configuration without dtlpy's bookkeeping keys."""
    return {k: v for k, v in (configuration or {}).items() if k not in DTLPY_CONFIG_KEYS}


def config_from_model(model: dl.Model) -> FinetuneConfig:
    """Validate a model's configuration, read once as a plain dict (the adapter's `configuration` mapping would
    write defaults of missing keys back to the platform). Model configuration > FinetuneConfig defaults.
    A trained model (one with artifacts) loads its architecture from them, so a model_name config JSON of the
    machine it was trained on need not exist here."""
    try:
        return build_config(hyperparameters(dict(model.configuration or {})), saved_model=bool(model.model_artifacts))
    except ConfigError as e:
        raise ConfigError(f"model {model.name!r} ({model.id}): {e}") from None


def item_resolver(folder: Path) -> ImageResolver:
    """An ImageResolver that fetches images by item id, in parallel, into folder/<item id>/."""

    def resolve(refs: list[str]) -> dict[str, str]:
        ids = [r for r in refs if _ITEM_ID.fullmatch(r)]
        if len(ids) < len(refs):
            logger.warning("%d prompt images are external URLs: not fetched", len(refs) - len(ids))
        with ThreadPoolExecutor(FETCH_THREADS) as pool:
            paths = list(pool.map(lambda item_id: fetch_item(item_id, folder / item_id), ids))
        found = {ref: path for ref, path in zip(ids, paths, strict=True) if path}
        logger.info("fetched %d of %d prompt images by item id", len(found), len(ids))
        return found

    return resolve


def fetch_item(item_id: str, folder: Path) -> str | None:
    """Download one item into `folder` (kept for other subsets); None when it cannot be had."""
    done = [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
    if done:
        return str(done[0])
    try:
        path = dl.items.get(item_id=item_id).download(local_path=str(folder), overwrite=True)
    except PLATFORM_ERRORS as e:  # e.g. NotFound: the image item was deleted
        logger.warning("cannot fetch item %s: %s", item_id, e)
        return None
    # item.download logs and returns None instead of raising when the transfer fails
    return path if isinstance(path, str) and Path(path).is_file() else None


def download_bytes(item: dl.Item) -> bytes:
    buffer = item.download(save_locally=False)
    if buffer is None:  # dtlpy logged why
        raise _Unusable("download failed", transient=True)
    return buffer.getvalue()


def decode_detail(e: ImageDecodeError) -> str:
    """Why an image could not be decoded, without the temporary path it was decoded from."""
    return _DECODE_PREFIX.sub("", str(e)).removesuffix("; re-export the file or remove it")


class _Locked:
    """A callable run under a lock: a tokenizer shared by the threads of a deployed service."""

    def __init__(self, fn: Callable[..., Any], lock: threading.Lock) -> None:
        self._fn, self._lock = fn, lock

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return self._fn(*args, **kwargs)


# --- embedding jobs: what is stored, what is not ------------------------------------------------------


class VectorsNotStoredError(ModelError):
    """An embedding job left vectors unstored (a failed upload or download); re-running the job stores them."""


class EmbedJob:
    """One embed_items call: the vectors the feature set already held, what this job uploaded, the items that
    cannot be embedded, and the first failure; result() returns dtlpy's (items, vectors) or raises."""

    def __init__(self, model: dl.Model, items: list[dl.Item], feature_set: dl.FeatureSet | None,
                 upload_prompts: bool) -> None:
        self.model, self.items, self.feature_set, self.upload_prompts = model, items, feature_set, upload_prompts
        self.stored: dict[str, list[float]] = {}
        self.fresh: dict[str, list[float]] = {}
        self.uploaded = 0
        self.kept_local = 0  # prompt items dtlpy does not upload unless asked to
        self.bad: list[Unusable] = []  # the item's fault: skipped
        self.unfetched: list[Unusable] = []  # not the item's fault: a re-run can embed them
        self.failure: str | None = None
        self.cause: BaseException | None = None
        if feature_set is None:
            return
        try:
            self.stored = stored_vectors(feature_set, [i.id for i in items])
        except PLATFORM_ERRORS as e:  # without knowing what is stored, embedding could only duplicate vectors
            self.failed(platform_failure(e, f"{VECTORS}/query"), e)
        if self.stored:
            logger.info("%d of %d items already have a vector in feature set %r: not embedded again",
                        len(self.stored), len(items), feature_set.name)

    def add(self, batch: list[dl.Item], prepared: list[PreparedItem], vectors: list[list[float] | None]) -> bool:
        """Record one embedded batch and upload its vectors; False when the upload failed."""
        for item, x, vector in zip(batch, prepared, vectors, strict=True):
            if isinstance(x, Unusable):
                (self.unfetched if x.transient else self.bad).append(x)
            elif vector is None:
                self.bad.append(Unusable(item.id, "nothing to embed"))
            else:
                self.fresh[item.id] = vector
        if self.feature_set is None:
            return True
        todo = [i for i in batch if i.id in self.fresh and (self.upload_prompts or not is_prompt_item(i))]
        self.kept_local += sum(1 for i in batch if i.id in self.fresh) - len(todo)
        if not todo:
            return True
        try:
            created = self.feature_set.features.create(
                entity=todo, value=[self.fresh[i.id] for i in todo], feature_set_id=self.feature_set.id,
                project_id=self.model.project_id,
            )
        except PLATFORM_ERRORS as e:  # requests' errors are OSErrors
            self.failed(platform_failure(e, VECTORS), e)
            return False
        if created is None:  # dtlpy's error_suppression swallowed the error
            self.failed("the upload was refused; see the dtlpy errors above", None)
            return False
        self.uploaded += len(todo)
        return True

    def failed(self, why: str, cause: BaseException | None) -> None:
        self.failure, self.cause = why, cause

    def result(self) -> tuple[list[dl.Item], list[list[float]]]:
        """dtlpy's return value; VectorsNotStoredError when a vector that should be stored is not."""
        n, name = len(self.items), self.model.name
        if self.bad:
            logger.warning("model %r: %d of %d items cannot be embedded and have no vector (skipped): %s", name,
                           len(self.bad), n, listing(self.bad))
        if self.failure is None and not self.unfetched:
            logger.info("model %r: %d items embedded, %d vectors uploaded, %d already stored", name,
                        len(self.fresh), self.uploaded, len(self.stored))
            done = [i for i in self.items if i.id in self.stored or i.id in self.fresh]
            return done, [self.stored[i.id] if i.id in self.stored else self.fresh[i.id] for i in done]
        raise VectorsNotStoredError(self.failure_message()) from self.cause

    def failure_message(self) -> str:
        done = self.uploaded + self.kept_local if self.feature_set is not None else len(self.fresh)
        settled = len(self.stored) + len(self.bad) + done
        missing = len(self.items) - settled
        what = "vectors were not stored" if self.feature_set is not None else "items were not embedded"
        causes = [self.failure] if self.failure else []
        if self.unfetched:
            causes.append(f"{len(self.unfetched)} items could not be downloaded: {listing(self.unfetched)}")
        message = (f"model {self.model.name!r}: {missing} of {len(self.items)} {what} ({'; '.join(causes)}); "
                   f"re-run embed_items or embed_dataset to store them: items already embedded are skipped")
        if self.bad:
            message += f". Besides, {len(self.bad)} items cannot be embedded (skipped): {listing(self.bad)}"
        return message


def stored_vectors(feature_set: dl.FeatureSet, item_ids: Sequence[str]) -> dict[str, list[float]]:
    """{item id: vector} of the items that already have a vector in `feature_set`.

    Extra copies of an item's vector are deleted, the newest kept: an upload that timed out on the client can
    still be stored by the platform, as can each of the SDK's automatic retries of it.
    """
    found: dict[str, list[dl.Feature]] = {}
    for start in range(0, len(item_ids), STORED_QUERY_CHUNK):
        chunk = list(item_ids[start : start + STORED_QUERY_CHUNK])
        filters = dl.Filters(resource=dl.FiltersResource.FEATURE, field="entityId", values=chunk,
                             operator=dl.FiltersOperations.IN)
        for page in feature_set.features.list(filters=filters):
            for feature in page:
                found.setdefault(feature.entity_id, []).append(feature)
    stored = {}
    for item_id, features in found.items():
        *extra, newest = sorted(features, key=lambda f: (str(f.created_at or ""), f.id))
        delete_vectors(feature_set, extra, item_id)
        stored[item_id] = list(newest.value)
    return stored


def delete_vectors(feature_set: dl.FeatureSet, features: Iterable[dl.Feature], item_id: str) -> None:
    for feature in features:
        try:
            feature_set.features.delete(feature_id=feature.id)
            logger.info("deleted a duplicate vector (%s) of item %s", feature.id, item_id)
        except PLATFORM_ERRORS as e:
            logger.warning("could not delete duplicate vector %s of item %s: %s", feature.id, item_id, e)


def platform_failure(e: BaseException, path: str) -> str:
    """The cause of a failed request to `path`, in a few words."""
    if isinstance(e, dl.exceptions.ExceptionMain):
        return f"HTTP {e.status_code} from {path}: {str(e.message)[:200]}"
    late = "; the platform may still store some late: a re-run deletes duplicate copies" if path == VECTORS else ""
    return f"no answer from {path} ({type(e).__name__}){late}"


def listing(unusable: Sequence[Unusable]) -> str:
    """The first LISTED_IN_LOGS items with their reasons, then how many more."""
    shown = ", ".join(u.describe() for u in unusable[:LISTED_IN_LOGS])
    return shown + (f" and {len(unusable) - LISTED_IN_LOGS} more" if len(unusable) > LISTED_IN_LOGS else "")


def decode_image(data: bytes, name: str) -> Image.Image:
    """images.load_image on an item's bytes; an error names the item's file."""
    return load_image(data, Path(name or "image").name)


def is_prompt_item(item: dl.Item) -> bool:
    system = (item.metadata or {}).get("system") or {}
    return (system.get("shebang") or {}).get("dltype") == "prompt"


def _prompt_order(key: str) -> tuple[int, int, str]:
    """Prompt keys are "1", "2", ...: numeric order, so "10" comes after "9"."""
    return (0, int(key), "") if str(key).isdigit() else (1, 0, str(key))


def unit_vectors(features: np.ndarray) -> list[list[float]]:
    """Rows renormalised in float64 (half-precision autocast leaves them slightly off unit length) as plain
    Python floats: the SDK serialises vectors as JSON, which numpy arrays are not."""
    f = np.asarray(features, dtype=np.float64)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    return f.tolist()


def _item_size(item: dl.Item) -> int | None:
    return ((item.metadata or {}).get("system") or {}).get("size")


def publish(model: dl.Model, samples: list[dl.PlotSample], dataset_id: str | None = None) -> None:
    """Model metrics for the platform's charts; a failure is logged, not raised (a chart is not worth a run)."""
    if not samples:
        return
    try:
        if model.metrics.create(samples=samples, dataset_id=dataset_id or model.dataset_id) is False:
            logger.warning("the platform did not accept %d metric samples", len(samples))
    except PLATFORM_ERRORS as e:
        logger.warning("could not publish %d metric samples: %s", len(samples), e)


def as_filters(filters: dl.Filters | dict | None) -> dl.Filters:
    if isinstance(filters, dl.Filters):
        return filters
    return dl.Filters(custom_filter=filters) if filters else dl.Filters()


def plot_samples(epoch: int, record: Mapping[str, float]) -> list[dl.PlotSample]:
    """Loss, learning rate and validation retrieval metrics of one epoch (epoch 0: the base model)."""
    samples = []
    if "train_loss" in record:
        samples.append(dl.PlotSample(figure="loss", legend="train", x=epoch, y=record["train_loss"]))
    if "lr" in record:
        samples.append(dl.PlotSample(figure="learning rate", legend="lr", x=epoch, y=record["lr"]))
    for direction in DIRECTIONS:
        for metric in PUBLISHED_METRICS:
            if f"{direction}/{metric}" in record:
                value = record[f"{direction}/{metric}"]
                samples.append(dl.PlotSample(figure=f"validation {direction}", legend=metric, x=epoch, y=value))
    return [s for s in samples if math.isfinite(s.y)]  # NaN is not JSON


def evaluation_samples(metrics: Mapping[str, float], legend: str) -> list[dl.PlotSample]:
    """recall@k over k, and MRR, per direction; one line per evaluated dataset."""
    samples = []
    for direction in DIRECTIONS:
        for k in EVAL_KS:
            samples.append(dl.PlotSample(figure=f"evaluation {direction} recall@k", legend=legend, x=k,
                                         y=metrics[f"{direction}/recall@{k}"]))
        samples.append(dl.PlotSample(figure=f"evaluation {direction} mrr", legend=legend, x=0,
                                     y=metrics[f"{direction}/mrr"]))
    return [s for s in samples if math.isfinite(s.y)]


def _empty_subset_message(name: str, folder: Path, report: DataReport) -> str:
    n_items = sum(1 for _ in (folder / "json").rglob("*.json")) if (folder / "json").is_dir() else 0
    return (
        f"{name}: {n_items} items, {report.summary()}; give each image a description (or each prompt a "
        "free-text annotation), or change the model's subsets (metadata.system.subsets) to select captioned items"
    )
