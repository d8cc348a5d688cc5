"""A Dataloop model's configuration as this package's FinetuneConfig, and the two keys dtlpy itself reads.

dtlpy's `adapter.configuration` writes through: `configuration.get(key, default)` with a missing key writes
the default into the model on the platform. So the raw dict is read once, here, and validated as a whole.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import dtlpy as dl

from adapters.clip_finetune.config import FinetuneConfig, build_config
from adapters.clip_finetune.errors import ConfigError
from adapters.clip_finetune.model.clip import ClipModel

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


def hyperparameters(configuration: Mapping[str, Any] | None) -> dict[str, Any]:
    """A model configuration without dtlpy's bookkeeping keys."""
    return {k: v for k, v in (configuration or {}).items() if k not in DTLPY_CONFIG_KEYS}


def config_from_model(model: dl.Model) -> FinetuneConfig:
    """Validate a model's configuration, read once as a plain dict. Model configuration > FinetuneConfig defaults.
    A trained model (one with artifacts) loads its architecture from them, so a model_name config JSON of the
    machine it was trained on need not exist here.

    embeddings_size is not validated against the architecture here, unlike on the command line: on the platform
    the configuration is one merged dict (Create New Model merges a pipeline's "Model config" over the base
    model's, whose embeddings_size names the base architecture), so a user choosing another model_name there
    could never set both right. The size is derived, and sync_embedding_keys writes it back to the model."""
    raw = model.configuration
    if raw is not None and not isinstance(raw, Mapping):
        raise ConfigError(f"model {model.name!r} ({model.id}): its configuration is a JSON {type(raw).__name__}, not "
                          "an object of hyperparameters; set it to an object such as {\"num_epochs\": 10}, or {} for "
                          "the defaults")
    hparams = hyperparameters(dict(raw or {}))
    hparams.pop("embeddings_size", None)
    try:
        return build_config(hparams, saved_model=bool(model.model_artifacts))
    except ConfigError as e:
        raise ConfigError(f"model {model.name!r} ({model.id}): {e}") from None


def sync_embedding_keys(model: dl.Model, clip: ClipModel, cfg: FinetuneConfig) -> None:
    """Make the two keys dtlpy's embed wrappers read agree with the loaded model, in one explicit update.

    dtlpy creates the feature set with configuration['embeddings_size'] (default 256) and silently drops
    vectors of any other length; it embeds configuration['batch_size'] items at a time (default 4).
    """
    config = model.configuration  # the raw dict: dict.get here writes nothing back
    size = clip.embed_dim
    if config.get("embeddings_size") not in (None, size):
        logger.warning("model %r: embeddings_size %s in its configuration does not match the loaded model (%s), "
                       "whose embeddings have %d dimensions: setting it to %d", model.name,
                       config["embeddings_size"], clip.source, size, size)
    changes = {k: v for k, v in {"embeddings_size": size, "batch_size": cfg.batch_size}.items() if config.get(k) != v}
    if changes:
        logger.info("model %r: setting %s in its configuration for dtlpy's embedding", model.name, changes)
        config.update(changes)
        model.update(reload_services=False)
