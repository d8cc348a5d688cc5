"""An embedding job (dtlpy's embed_items / embed_dataset, made resumable and loud): what the feature set
already holds, the vectors uploaded batch by batch, the items that cannot be embedded, and the first failure.

The vectors come from the one embedding pipeline (retrieval/embed.py), as the CLI's do.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import dtlpy as dl
import torch

from adapters.clip_finetune.app.embed import embed_inputs
from adapters.clip_finetune.data.pairs import DataReport
from adapters.clip_finetune.errors import ModelError
from adapters.clip_finetune.model.clip import ClipModel

from .items import FETCH_THREADS, PreparedItem, Unusable
from .platform import PLATFORM_ERRORS, VECTORS, is_prompt_item, platform_failure

logger = logging.getLogger(__name__)

STORED_QUERY_CHUNK = 500  # item ids per query for the vectors a feature set already holds
LISTED_IN_LOGS = 20  # bad items named one by one in an embedding job's warning; the rest are counted


class VectorsNotStoredError(ModelError):
    """An embedding job left vectors unstored (a failed upload or download); re-running the job stores them."""


class EmbedLocks:
    """A deployed service runs several executions at once on one adapter: embedding is called from many threads.
    Inference itself is safe (eval mode, inference_mode); the shared report and the tokenizer (Hugging Face fast
    tokenizers raise "Already borrowed" when called concurrently) are not."""

    def __init__(self) -> None:
        self.report = threading.Lock()
        self.tokenizer = threading.Lock()


def embed_prepared(clip: ClipModel, batch: list[PreparedItem], report: DataReport, locks: EmbedLocks
                   ) -> list[list[float] | None]:
    """One unit vector (plain floats: the SDK serialises vectors as JSON) per entry, in order; None where the
    item could not be prepared. Counts what was embedded and skipped in `report`."""
    vectors: list[list[float] | None] = [None] * len(batch)
    images = [i for i, x in enumerate(batch) if isinstance(x, torch.Tensor)]
    texts = [i for i, x in enumerate(batch) if isinstance(x, str) and x]
    if texts:  # the tokenizer is shared by the service's threads
        clip = replace(clip, tokenizer=_Locked(clip.tokenizer, locks.tokenizer))
    image_vectors, text_vectors = embed_inputs(clip, torch.stack([batch[i] for i in images]) if images else None,
                                               [batch[i] for i in texts])
    for i, v in zip(images + texts, image_vectors.tolist() + text_vectors.tolist(), strict=True):
        vectors[i] = v
    with locks.report:  # `+=` on a shared counter loses updates between threads
        for x in batch:
            if isinstance(x, Unusable):
                report.skip(x.reason, x.item_id)
            elif not isinstance(x, torch.Tensor | str) or x == "":
                report.skip("nothing to embed", repr(x)[:40])
        report.used += len(images) + len(texts)
    return vectors


class _Locked:
    """A callable run under a lock: a tokenizer shared by the threads of a deployed service."""

    def __init__(self, fn: Callable[..., Any], lock: threading.Lock) -> None:
        self._fn, self._lock = fn, lock

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return self._fn(*args, **kwargs)


def run_job(job: EmbedJob, prepare: Callable[[dl.Item], PreparedItem],
            embed: Callable[[list[PreparedItem]], list[list[float] | None]], batch_size: int, progress: Any = None
            ) -> tuple[list[dl.Item], list[list[float]]]:
    """Embed the job's items not yet stored, batch by batch: items prepared on FETCH_THREADS threads (downloads),
    embedded, uploaded; the first failure stops the job, which then raises VectorsNotStoredError."""
    todo = [item for item in job.items if item.id not in job.stored] if job.failure is None else []
    with ThreadPoolExecutor(FETCH_THREADS) as pool:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            prepared = list(pool.map(prepare, batch))
            try:
                vectors = embed(prepared)
            except Exception as e:  # counted, then raised as VectorsNotStoredError by job.result()
                job.failed(f"embed() raised {type(e).__name__}: {e}", e)
                break
            if not job.add(batch, prepared, vectors):
                break  # the upload failed: the platform is unlikely to take the next batch
            if progress is not None:
                progress.update(progress=int(100 * (start + len(batch)) / len(todo)),
                                message=f"embedded {start + len(batch)}/{len(todo)} items")
    return job.result()


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


def without_unstored(model: dl.Model, items: list[dl.Item]) -> list[dl.Item]:
    """`items` less the prompt items, whose vectors dtlpy does not store unless upload_features is set: a job
    that only fills the feature set (a dataset embedding) would fetch their images and embed them for nothing."""
    kept = [i for i in items if not is_prompt_item(i)]
    if len(kept) < len(items):
        logger.info("model %r: %d prompt items not embedded: their vectors would not be stored (set "
                    "upload_features to store them)", model.name, len(items) - len(kept))
    return kept


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


def listing(unusable: Sequence[Unusable]) -> str:
    """The first LISTED_IN_LOGS items with their reasons, then how many more."""
    shown = ", ".join(u.describe() for u in unusable[:LISTED_IN_LOGS])
    return shown + (f" and {len(unusable) - LISTED_IN_LOGS} more" if len(unusable) > LISTED_IN_LOGS else "")
