"""ClipAdapter: the Dataloop model adapter (the manifest's entryPoint). It only translates between platform
entities (models, items, datasets, artifacts, feature sets, metrics) and the package's calls; the work lives
beside it in dataloop/ (configuration, items, embed_job, artifacts, charts) and in the engine.

dtlpy's runner loads this file by path (dataloop.json `entryPoint`), without registering it in sys.modules:
imports are absolute and no @dataclass is defined here.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dtlpy as dl

from adapters.clip_finetune.app.evaluate import score_in_galleries, score_per_query
from adapters.clip_finetune.app.models import open_model
from adapters.clip_finetune.app.train import Training
from adapters.clip_finetune.config import FinetuneConfig
from adapters.clip_finetune.data.load import Splits, load_dataset, load_splits, require_pairs
from adapters.clip_finetune.data.pairs import DataReport
from adapters.clip_finetune.dataloop.artifacts import RunStateSync, check_artifacts, drop_stale_vectors, weights_stamp
from adapters.clip_finetune.dataloop.boundary import guarded
from adapters.clip_finetune.dataloop.charts import evaluation_samples, plot_samples, publish
from adapters.clip_finetune.dataloop.configuration import config_from_model, sync_embedding_keys
from adapters.clip_finetune.dataloop.dataset_embedding import embed_dataset as embed_dataset_files
from adapters.clip_finetune.dataloop.downloads import check_downloads, count_failed, failed_downloads
from adapters.clip_finetune.dataloop.embed_job import EmbedJob, EmbedLocks, embed_prepared, run_job, without_unstored
from adapters.clip_finetune.dataloop.items import PROMPT_IMAGES, PreparedItem, item_resolver, prepare_item
from adapters.clip_finetune.dataloop.platform import as_filters
from adapters.clip_finetune.errors import ModelError
from adapters.clip_finetune.machine import apply_config
from adapters.clip_finetune.model.clip import ClipModel, is_artifact_dir, save_artifact
from adapters.clip_finetune.retrieval.evaluation_result import EvaluationResult
from adapters.clip_finetune.retrieval.formatting import format_table
from adapters.clip_finetune.training import TrainResult

logger = logging.getLogger(__name__)

SUBSETS_HINT = "or change the model's subsets (metadata.system.subsets) to select captioned items"


@guarded  # bad input fails an execution with one clean message (dataloop/boundary.py)
class ClipAdapter(dl.BaseModelAdapter):
    """Fine-tune, evaluate and embed with open_clip models on the Dataloop platform."""

    def __init__(self, model_entity: dl.Model | None = None) -> None:
        self.cfg: FinetuneConfig | None = None
        self.clip: ClipModel | None = None
        self.result: TrainResult | None = None
        self.data_reports: dict[str, DataReport] = {}  # per subset, from the last data read
        self.embed_report = DataReport()  # items embedded and skipped (with why) since the adapter was built
        self.evaluation: dict[str, float] = {}
        self.evaluation_result: EvaluationResult | None = None  # the last evaluate(), per query (promotion.py)
        self._locks = EmbedLocks()
        self._splits: Splits | None = None
        self._splits_root: Path | None = None
        self._trained_dir: Path | None = None
        self._artifacts_dir: Path | None = None  # where load_from_model put the model's artifacts
        self._sync: RunStateSync | None = None  # the run state of the training in progress, in the artifacts
        self._failed = False  # training failed: nothing trained to save or upload
        self._cfg_model_id: str | None = None  # the model self.cfg was validated for
        self._weights: tuple | None = None  # weights_stamp of the model's artifacts the weights in memory came from
        self._base_weights = False  # the weights in memory are the configured base model's: no trained artifacts
        super().__init__(model_entity=model_entity)  # calls load_from_model when given a model

    # --- configuration and weights ---------------------------------------------------------------------

    def load_from_model(
        self, model_entity: dl.Model | None = None, local_path: str | None = None, overwrite: bool = True, **kwargs: Any
    ) -> None:
        """Validate the model's configuration first, so a bad key fails before dtlpy downloads anything."""
        model = model_entity if model_entity is not None else self.model_entity
        self._validate_config(model)
        weights = weights_stamp(model)  # before the download: a change after it must not look loaded
        super().load_from_model(model_entity=model_entity, local_path=local_path, overwrite=overwrite, **kwargs)
        self._weights = weights

    def load(self, local_path: str, **kwargs: Any) -> None:
        """The saved artifact in `local_path` (a trained model), else the configured base model."""
        if self._cfg_model_id != self.model_entity.id:  # load() called without load_from_model
            self._validate_config(self.model_entity)
        self._artifacts_dir = Path(local_path)
        self._base_weights = not is_artifact_dir(local_path)
        self.clip = open_model(self.cfg, None if self._base_weights else local_path)
        self.model = self.clip.model
        sync_embedding_keys(self.model_entity, self.clip, self.cfg)

    def holds_weights_of(self, model: dl.Model) -> bool:
        """Whether the weights in memory are `model`'s current ones (it was not trained again since)."""
        loaded = self._model_entity is not None and self._model_entity.id == model.id and self.clip is not None
        return loaded and self._weights == weights_stamp(model)

    def _validate_config(self, model: dl.Model) -> None:
        self.cfg = config_from_model(model)
        self._cfg_model_id = model.id
        apply_config(self.cfg.data)  # decoding in embed/evaluate honours the pixel limit too

    def save(self, local_path: str, **kwargs: Any) -> None:
        """Write the weights in memory (after train(): the best epoch's) as an open_clip local-dir artifact."""
        if self._failed:
            logger.warning("training failed: not saving the untrained weights to %s", local_path)
            return
        if self._trained_dir == Path(local_path).resolve() and is_artifact_dir(local_path):
            return  # train() already wrote the best epoch there (finetune saves it); rewriting would only cost time
        save_artifact(self.clip, local_path, self.cfg, self.result.to_dict() if self.result else None)

    def save_to_model(
        self, local_path: str | None = None, cleanup: bool = False, replace: bool = True, **kwargs: Any
    ) -> None:
        """dtlpy's save + upload, then a check that the weights really reached the model: dtlpy only logs a
        failed upload, and the model would end 'trained' without weights."""
        if self._failed:
            # dtlpy's train_model calls this again after an exception; training leaves no partial checkpoint,
            # and uploading the base weights would pass them off as trained ones.
            logger.warning("training failed: not uploading %s", local_path)
            return
        local_path = local_path or tempfile.mkdtemp(prefix=f"model_{self.model_entity.name}")
        if self._sync is not None:
            self._sync.drop_checkpoint()
        super().save_to_model(local_path=local_path, cleanup=False, replace=replace, **kwargs)
        try:
            check_artifacts(self.model_entity.id, Path(local_path))
        except ModelError:
            self._failed = True
            raise
        drop_stale_vectors(self.model_entity)
        self._weights = weights_stamp(self.model_entity)  # the weights in memory are the ones just uploaded
        if cleanup:
            shutil.rmtree(local_path, ignore_errors=True)

    # --- training ---------------------------------------------------------------------------------------

    def prepare_data(self, dataset: dl.Dataset, root_path: str | None = None, data_path: str | None = None,
                     output_path: str | None = None, overwrite: bool = False, **kwargs: Any) -> tuple[str, str, str]:
        """dtlpy's download of the subsets; when it fails because a subset's every item failed to download (dtlpy
        1.126 then ends in a TypeError of its own), the error says so."""
        try:
            return super().prepare_data(dataset, root_path=root_path, data_path=data_path, output_path=output_path,
                                        overwrite=overwrite, **kwargs)
        except (TypeError, ValueError):
            # where dtlpy put the download (train_model passes root_path; its default data_path lies under it)
            folder = data_path or self.adapter_defaults.resolve("data_path", None) or (
                str(Path(root_path) / "datasets" / dataset.id) if root_path else None)
            if folder is not None and Path(folder).is_dir():
                check_downloads(failed_downloads(self.model_entity, Path(folder)), Path(folder))
            raise

    def convert_from_dtlpy(self, data_path: str, **kwargs: Any) -> None:
        """Read and check the downloaded subsets (prepare_data calls this right after downloading), so a subset
        with no usable pairs fails here, before training starts."""
        root = Path(data_path)
        # dtlpy only logs an item it could not download: counted against what the model's subsets select
        failed = failed_downloads(self.model_entity, root) if self._model_entity is not None else {}
        check_downloads(failed, root)
        self._splits = load_splits(root, resolver=item_resolver(root / PROMPT_IMAGES), cfg=self.cfg,
                                   what="the model's subsets",
                                   no_pairs_hint=SUBSETS_HINT, no_train_hint="define metadata.system.subsets.train "
                                   "on the model")
        count_failed(failed, self._splits.reports)
        self.data_reports = self._splits.reports
        self._splits_root = root.resolve()

    def train(self, data_path: str, output_path: str, **kwargs: Any) -> None:
        """Fine-tune on <data_path>/train; <data_path>/validation picks the best epoch. The best epoch's weights
        stay in memory and are written to output_path (open_clip artifact + metrics.json + data_report.json)."""
        self._failed = True  # until training returns: dtlpy's failure path must not upload the base weights
        if self._splits_root != Path(data_path).resolve():
            self.convert_from_dtlpy(data_path)
        self._sync = RunStateSync(self.model_entity)
        try:
            # _validate_config applied self.cfg when the model loaded
            self.result = Training(self.cfg, self._splits, clip=self.clip, applied=True).run(
                output_path, on_epoch_end=self._epoch_reporter(kwargs.get("on_epoch_end_callback")),
                on_checkpoint=self._sync.upload, resume=self._sync.stage(self._artifacts_dir, Path(output_path)))
        except BaseException:
            self._sync.finish()  # the last checkpoint reaches the artifacts: a restart resumes from it
            raise
        # the base model at epoch 0 of the validation curves (result.before is the test split's when there is one)
        publish(self.model_entity, plot_samples(0, self.result.selection.get("before", {})))
        self._trained_dir = Path(output_path).resolve()
        self._failed = False
        self._base_weights = False
        logger.info("best epoch %d; before/after on the %s subset:\n%s", self.result.best_epoch,
                    "test" if self.result.scored_on == "test" else "validation",
                    format_table(self.result.before, self.result.after) if self.result.before else "(none)")

    def _epoch_reporter(self, progress: Callable[[int, int], None] | None) -> Callable[[int, dict[str, float]], None]:
        def on_epoch_end(epoch: int, record: dict[str, float]) -> None:
            if progress is not None:
                progress(epoch - 1, self.cfg.num_epochs)  # dtlpy's callback counts epochs from 0
            publish(self.model_entity, plot_samples(epoch, record))

        return on_epoch_end

    # --- embedding --------------------------------------------------------------------------------------

    def prepare_item_func(self, item: dl.Item) -> PreparedItem:
        """Runs in dtlpy's thread pool, so embed() does model work only (dataloop/items.py)."""
        return prepare_item(self.clip, item)

    def embed(self, batch: list[PreparedItem], **kwargs: Any) -> list[list[float] | None]:
        """One unit vector (plain floats) per entry, in order; None where the item could not be prepared."""
        return embed_prepared(self.clip, batch, self.embed_report, self._locks)

    @dl.Package.decorators.function(
        display_name="Embed Items",
        inputs={"items": "Item[]"},
        outputs={"items": "Item[]", "features": "Json[]"},
    )
    def embed_items(
        self, items: list, upload_features: bool | None = None, batch_size: int | None = None, progress: Any = None,
        only_stored: bool = False, **kwargs: Any,
    ) -> tuple[list[dl.Item], list[list[float]]]:
        """dtlpy's embed_items (embed_dataset runs it too), made resumable and loud (dataloop/embed_job.py):
        vectors the feature set already holds are not embedded again; a failed upload or download raises
        VectorsNotStoredError with the count not stored; an item that cannot be embedded is skipped, counted in
        embed_report and listed. As in dtlpy, prompt items are uploaded only with upload_features=True, and the
        return value is the items that have a vector and their vectors, in input order; `only_stored` (a caller
        that only fills the feature set) does not embed the items whose vectors would not be stored."""
        self._require_trained_weights()
        items = list(items) if isinstance(items, list | tuple) else [items]
        if upload_features is None:
            upload_features = self.model_entity.configuration.get("upload_features")  # the raw dict: no write
        feature_set = self.feature_set if upload_features is not False else None
        if only_stored and feature_set is not None and upload_features is not True:
            items = without_unstored(self.model_entity, items)
        job = EmbedJob(self.model_entity, items, feature_set, upload_prompts=upload_features is True)
        return run_job(job, self.prepare_item_func, self.embed, batch_size or self.cfg.batch_size, progress)

    def _require_trained_weights(self) -> None:
        """A model whose artifacts hold no trained weights loaded the configured base model: its vectors would be
        stored as the model's own. Only a pre-trained entity (the app's shipped models) embeds with them."""
        status = self.model_entity.status
        if self._base_weights and status != "pre-trained":
            raise ModelError(f"model {self.model_entity.name!r} (status {status!r}) has no trained weights in its "
                             f"artifacts: embedding would store the base model's vectors ({self.cfg.model_name}) as "
                             "its own; train it first (its artifacts then hold the weights), or embed with a "
                             "pre-trained model")

    @dl.Package.decorators.function(
        display_name="Embed Dataset with DQL",
        inputs={"dataset": "Dataset", "filters": "Json"},
    )
    def embed_dataset(self, dataset: dl.Dataset, filters: dl.Filters | dict | None = None, progress: Any = None,
                      **kwargs: Any) -> int:
        """Fill the model's feature set with the dataset's files `filters` selects, in this process (dtlpy's
        embed_dataset sends subsets past 1000 items to the model's deployed service, which a model trained by a
        pipeline does not have; the pipeline's Embed dataset node fans out itself). Returns the count embedded."""
        return embed_dataset_files(self, dataset, filters, progress=progress)

    # --- evaluation -------------------------------------------------------------------------------------

    @dl.Package.decorators.function(
        display_name="Evaluate a Model",
        inputs={"model": dl.Model, "dataset": dl.Dataset, "filters": "Json"},
        outputs={"model": dl.Model, "dataset": dl.Dataset},
    )
    def evaluate_model(
        self, model: dl.Model, dataset: dl.Dataset, filters: dl.Filters | dict | None = None, progress: Any = None,
        context: Any = None,
    ) -> tuple[dl.Model, dl.Dataset]:
        """dtlpy's evaluate_model without its predict step (it would download every item to make annotations
        an embedding model does not have): load the model unless its weights are the ones in memory (the same
        model trained again since is reloaded), then evaluate()."""
        if not self.holds_weights_of(model):
            self.load_from_model(model_entity=model)
        if progress is not None:
            progress.update(message="calculating retrieval metrics", progress=50)
        return self.evaluate(model=model, dataset=dataset, filters=filters), dataset

    def evaluate(
        self, model: dl.Model, dataset: dl.Dataset, filters: dl.Filters | dict | None = None, **kwargs: Any
    ) -> dl.Model:
        """Retrieval metrics (both directions) of the loaded model on the captioned items `filters` selects,
        published to `model`; replaces dtlpy's scoring of box/class/polygon annotations. `galleries=True`: ranked
        in galleries of 1,000 images, as training ranks a retention set (app.evaluate.score_in_galleries)."""
        with tempfile.TemporaryDirectory(prefix="clip-evaluate-") as tmp:
            folder = Path(tmp) / "evaluation"
            list(dataset.items.download(filters=as_filters(filters), local_path=str(folder),
                                        annotation_options=dl.ViewAnnotationOptions.JSON))  # a lazy generator
            name = f"dataset {dataset.name!r}"
            pairs, report = self._read_evaluation_set(folder, Path(tmp) / PROMPT_IMAGES, name)
            score = score_in_galleries if kwargs.get("galleries") else score_per_query
            self.evaluation_result = score(self.clip, pairs, self.cfg)
            self.evaluation = self.evaluation_result.metrics()
        logger.info("evaluation on %s (%s):\n%s", dataset.name, report.summary(), format_table(self.evaluation))
        publish(model, evaluation_samples(self.evaluation, dataset.name), dataset.id)
        return model

    def _read_evaluation_set(self, folder: Path, prompt_images: Path, name: str) -> tuple[list, DataReport]:
        subsets, reports = load_dataset(folder, item_resolver(prompt_images), single_name="evaluation",
                                        label_template=self.cfg.label_templates[0]) \
            if folder.is_dir() else ({"evaluation": []}, {"evaluation": DataReport()})
        pairs, report = subsets["evaluation"], reports["evaluation"]
        self.data_reports["evaluation"] = report
        require_pairs(name, pairs, report, folder, "or change the filters to select captioned items")
        return pairs, report
