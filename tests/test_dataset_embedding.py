"""Dataset embedding (dataloop/dataset_embedding.py) and the promotion gate's rules, on the loopback platform."""

from __future__ import annotations

import dtlpy as dl
import pytest
from helpers import QUICK_CONFIG, add_model, image_bytes, seed_shapes
from loopback_platform import LoopbackPlatform

from adapters.clip_finetune.data.synthetic import render, sample_specs
from adapters.clip_finetune.dataloop.adapter import ClipAdapter
from adapters.clip_finetune.dataloop.promotion import better, compare_settings
from adapters.clip_finetune.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_dataset_embedding_does_not_embed_prompt_items_whose_vectors_it_would_not_store(
    platform: LoopbackPlatform,
) -> None:
    """dtlpy stores prompt items' vectors only with upload_features set: embedding them would fetch their
    images (one request each) for vectors thrown away."""
    shapes = seed_shapes(platform, {"train": 3})
    elsewhere = platform.add_dataset(shapes.project["id"], "prompt-images")
    image = platform.add_item(elsewhere["id"], image_bytes(render(sample_specs(1, seed=5)[0])), "/p.png")
    platform.add_prompt_item(shapes.dataset["id"], "/prompts/p.json", [{"image": platform.stream_url(image["id"])}])
    adapter = ClipAdapter(model_entity=add_model(platform, shapes, QUICK_CONFIG))

    embedded = adapter.embed_dataset(dl.datasets.get(dataset_id=shapes.dataset["id"]))

    assert platform.calls_to("GET", rf"^/items/{image['id']}") == []  # the prompt's image was never fetched
    (feature_set,) = platform.model_feature_sets(adapter.model_entity.id)
    assert {v["entityId"] for v in platform.vectors(feature_set["id"])} == {i["id"] for i in shapes.items["train"]}
    assert embedded == 3


@pytest.mark.parametrize(
    ("metric", "new", "old", "margin", "promoted"),
    [
        ("text_to_image/mrr", 0.31, 0.30, 0.0, True),
        ("text_to_image/mrr", 0.30, 0.30, 0.0, False),  # a tie keeps the current model
        ("text_to_image/mrr", 0.31, 0.30, 0.02, False),  # not better by more than the margin
        ("text_to_image/median_rank", 4.0, 6.0, 1.0, True),  # ranks: lower is better
        ("text_to_image/median_rank", 6.0, 4.0, 0.0, False),
    ],
)
def test_the_gate_promotes_only_a_model_better_by_more_than_the_margin(
    metric: str, new: float, old: float, margin: float, promoted: bool
) -> None:
    assert better(new, old, metric, margin) is promoted


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"metric": "text_to_image/mmr"}, "metric: unknown metric 'text_to_image/mmr'"),
        ({"margin": -0.1}, "margin: must be a number >= 0 (got -0.1)"),
        ({"metrc": "text_to_image/mrr"}, "compare_config: unknown keys ['metrc']"),
    ],
)
def test_a_bad_promotion_config_is_refused_naming_the_key(config: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        compare_settings(config)
    assert compare_settings(None) == ("text_to_image/mrr", 0.0)
