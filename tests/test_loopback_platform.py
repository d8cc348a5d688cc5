"""The real dtlpy client against the loopback platform: what reaches the server, and the SDK behaviours
an adapter must know (each test name states one)."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dtlpy as dl
import pytest
import requests
from helpers import REPO
from loopback_platform import (
    LoopbackPlatform,
    SeededProject,
    dql_match,
    dql_page,
    png_bytes,
    seed_captioned_images,
)

EMBEDDINGS_SIZE = 8
WEIGHTS = b"tiny-weights"


class TinyAdapter(dl.BaseModelAdapter):
    """The smallest adapter: records what the SDK hands it, weights are one small file."""

    wrong_length_ids: set[str] = set()

    def load(self, local_path: str, **kwargs: Any) -> None:
        path = Path(local_path)
        self.loaded = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()} if path.is_dir() else {}

    def save(self, local_path: str, **kwargs: Any) -> None:
        (Path(local_path) / "weights.bin").write_bytes(WEIGHTS)

    def train(self, data_path: str, output_path: str, **kwargs: Any) -> None:
        self.data_path, self.output_path = Path(data_path), Path(output_path)

    def convert_from_dtlpy(self, data_path: str, **kwargs: Any) -> None:
        pass  # the base class raises NotImplementedError, and prepare_data always calls it

    def prepare_item_func(self, item: dl.Item) -> dl.Item:
        return item  # the default decodes every item as an image

    def embed(self, batch: list[dl.Item], **kwargs: Any) -> list[list[float]]:
        return [
            [0.25] * (EMBEDDINGS_SIZE - 1 if item.id in self.wrong_length_ids else EMBEDDINGS_SIZE) for item in batch
        ]


@pytest.fixture
def seeded(platform: LoopbackPlatform) -> SeededProject:
    # Unique model names: dtlpy keys artifacts (and load_from_model's local dir) by model NAME.
    return seed_captioned_images(
        platform,
        model_name=f"clip-{uuid.uuid4().hex[:8]}",
        model_configuration={"embeddings_size": EMBEDDINGS_SIZE, "batch_size": 2},
    )


# ---------------------------------------------------------------------------------------------- entities
def test_projects_datasets_and_tag_filter_list_exactly_the_tagged_items(
    platform: LoopbackPlatform, seeded: SeededProject
) -> None:
    project = dl.projects.get(project_id=seeded.project["id"])
    dataset = dl.datasets.get(dataset_id=seeded.dataset["id"])
    pages = dataset.items.list(filters=dl.Filters(field="metadata.system.tags.train", values=True))

    assert (project.name, dataset.name) == (seeded.project["name"], seeded.dataset["name"])
    assert pages.items_count == 3
    assert sorted(item.name for item in pages.all()) == sorted(i["name"] for i in seeded.items["train"])
    query = platform.calls_to("POST", rf"^/datasets/{dataset.id}/query$")[-1].json
    assert {"metadata.system.tags.train": True} in query["filter"]["$and"]
    assert platform.unhandled == []


def test_paging_walks_every_page_by_id_cursor(platform: LoopbackPlatform, seeded: SeededProject) -> None:
    dataset = dl.datasets.get(dataset_id=seeded.dataset["id"])

    pages = dataset.items.list(page_size=2)
    total = pages.items_count
    names = [item.name for page in pages for item in page]

    assert (total, len(names)) == (6, 6)
    # Iterating re-queries with an id cursor, so items_count ends as the LAST query's count: read it first.
    assert pages.items_count == 2
    # dtlpy pages by keyset: sort by id, then {"id": {"$gt": <last id>}} on each next page.
    queries = [c.json for c in platform.calls_to("POST", r"/query$")]
    assert any({"id": {"$gt": seeded.items["train"][1]["id"]}} in q["filter"]["$and"] for q in queries)
    assert all(q["sort"] == {"id": "ascending"} for q in queries)


def test_item_download_returns_the_stored_bytes(platform: LoopbackPlatform, seeded: SeededProject) -> None:
    stored = seeded.items["train"][0]
    buffer = dl.items.get(item_id=stored["id"]).download(save_locally=False)

    assert buffer.read() == platform.item_bytes(stored["id"])


def test_upload_sends_chunked_multipart_and_the_item_size_matches_the_file(
    platform: LoopbackPlatform, seeded: SeededProject, tmp_path: Path
) -> None:
    local = tmp_path / "new.png"
    local.write_bytes(png_bytes((1, 2, 3), size=(33, 17)))

    item = dl.datasets.get(dataset_id=seeded.dataset["id"]).items.upload(local_path=str(local), remote_path="/up")

    assert item.filename == "/up/new.png"
    stored = platform.item(item.id)["metadata"]["system"]
    assert stored["size"] == local.stat().st_size == item.metadata["system"]["size"]
    assert (stored["width"], platform.item_bytes(item.id)) == (33, local.read_bytes())
    upload = platform.calls_to("POST", r"/items$")[-1]
    assert upload.query["mode"] == ["skip"] and upload.form["path"] == "/up/new.png"
    assert upload.headers["Transfer-Encoding"] == "chunked"  # aiohttp streams the file


# ------------------------------------------------------------------------------------------------ train
def test_train_model_downloads_subsets_trains_and_uploads_artifacts(
    platform: LoopbackPlatform, seeded: SeededProject, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # train_model downloads under ./tmp/<model id>/ relative to the cwd
    model_id, dataset_id = seeded.model["id"], seeded.dataset["id"]
    adapter = TinyAdapter()

    adapter.train_model(dl.models.get(model_id=model_id))

    assert adapter.data_path == Path("tmp", model_id, "datasets", dataset_id)
    assert adapter.output_path == Path("tmp", model_id, "output")
    for subset in ("train", "validation"):
        images = sorted(p.name for p in (adapter.data_path / subset / "items" / "images" / subset).iterdir())
        assert images == sorted(i["name"] for i in seeded.items[subset])
        item_json = json.loads((adapter.data_path / subset / "json" / "images" / subset / "0.json").read_text())
        assert item_json["description"] == f"a {subset} picture number 0"
        assert [a["coordinates"] for a in item_json["annotations"]] == [item_json["description"]]
    assert platform.model_statuses(model_id) == ["pre-trained", "training", "trained"]
    assert platform.artifact_files(model_id) == {"weights.bin": WEIGHTS}
    artifact = platform.artifacts(model_id)[0]
    assert artifact["filename"] == f"/artifacts/models/{seeded.model['name']}/weights.bin"
    assert artifact["datasetId"] == platform.binaries_dataset(seeded.project["id"])["id"]

    fresh = TinyAdapter(model_entity=dl.models.get(model_id=model_id))  # __init__ calls load_from_model

    assert fresh.loaded == {"weights.bin": WEIGHTS}
    assert platform.unhandled == []


def test_adapter_configuration_writes_defaults_back_to_the_model(
    platform: LoopbackPlatform, seeded: SeededProject, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    model_id = seeded.model["id"]

    TinyAdapter().train_model(dl.models.get(model_id=model_id))

    # AdapterDefaults and every configuration.get(key, default) on a missing key PATCH the model.
    config = platform.model(model_id)["configuration"]
    assert config["root_path"] == str(Path("tmp", model_id))
    assert {"include_background", "upload_features", "data_path", "output_path"} <= set(config)
    assert len(platform.calls_to("PATCH", rf"^/ml/models/{model_id}$")) > 5


def test_artifact_upload_failure_still_ends_trained_without_weights(
    platform: LoopbackPlatform, seeded: SeededProject, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    binaries = platform.binaries_dataset(seeded.project["id"])["id"]
    platform.fail("POST", rf"^/datasets/{binaries}/items$", status=500, times=None)

    TinyAdapter().train_model(dl.models.get(model_id=seeded.model["id"]))  # does not raise

    assert platform.model(seeded.model["id"])["status"] == "trained"
    assert platform.artifacts(seeded.model["id"]) == []
    assert len(platform.calls_to("POST", rf"^/datasets/{binaries}/items$")) == 5  # uploader NUM_TRIES


def test_artifacts_are_found_by_model_name_so_same_named_models_share_files(
    platform: LoopbackPlatform, seeded: SeededProject, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    name = seeded.model["name"]
    platform.add_item(
        platform.binaries_dataset(seeded.project["id"])["id"],
        b"other model's file",
        f"/artifacts/models/{name}/stale.bin",
    )

    TinyAdapter().train_model(dl.models.get(model_id=seeded.model["id"]))

    # save_to_model lists dir "/artifacts/models/<name>*" and makes EVERY match a model artifact.
    assert set(platform.artifact_files(seeded.model["id"])) == {"weights.bin", "stale.bin"}


# ------------------------------------------------------------------------------------------------ embed
def test_embed_items_uploads_one_vector_per_item_in_one_bulk_request(
    platform: LoopbackPlatform, seeded: SeededProject
) -> None:
    adapter = TinyAdapter(model_entity=dl.models.get(model_id=seeded.model["id"]))
    items = list(dl.datasets.get(dataset_id=seeded.dataset["id"]).items.list().all())

    adapter.embed_items(items)

    (feature_set,) = platform.model_feature_sets(seeded.model["id"])
    assert (feature_set["size"], feature_set["name"]) == (EMBEDDINGS_SIZE, seeded.model["name"])
    created = platform.calls_to("POST", r"^/features/sets$")[0].json
    assert created["entityType"] == "item" and created["modelId"] == seeded.model["id"]
    assert sorted(v["entityId"] for v in platform.vectors(feature_set["id"])) == sorted(i.id for i in items)
    assert len(platform.calls_to("POST", r"^/features/vectors$")) == 1  # all batches, one POST


def test_embed_items_silently_drops_vectors_of_the_wrong_length(
    platform: LoopbackPlatform, seeded: SeededProject
) -> None:
    adapter = TinyAdapter(model_entity=dl.models.get(model_id=seeded.model["id"]))
    items = list(dl.datasets.get(dataset_id=seeded.dataset["id"]).items.list().all())
    adapter.wrong_length_ids = {items[0].id}

    returned_items, vectors = adapter.embed_items(items)  # no exception: a warning per dropped item

    (feature_set,) = platform.model_feature_sets(seeded.model["id"])
    assert items[0].id not in {v["entityId"] for v in platform.vectors(feature_set["id"])}
    assert len(platform.vectors(feature_set["id"])) == len(vectors) == len(returned_items) == len(items) - 1


def test_embed_dataset_embeds_every_file_item_in_process(platform: LoopbackPlatform, seeded: SeededProject) -> None:
    adapter = TinyAdapter(model_entity=dl.models.get(model_id=seeded.model["id"]))

    adapter.embed_dataset(dl.datasets.get(dataset_id=seeded.dataset["id"]))

    (feature_set,) = platform.model_feature_sets(seeded.model["id"])
    assert len(platform.vectors(feature_set["id"])) == 6
    assert platform.calls_to("POST", r"^/ml/models/.*/embed") == []  # <= 1000 items: no executions


def test_vector_upload_500_is_logged_then_raised_as_a_plain_exception(
    platform: LoopbackPlatform, seeded: SeededProject
) -> None:
    adapter = TinyAdapter(model_entity=dl.models.get(model_id=seeded.model["id"]))
    items = list(dl.datasets.get(dataset_id=seeded.dataset["id"]).items.list().all())
    platform.fail("POST", r"^/features/vectors$", status=500)

    with pytest.raises(Exception, match="Failed to upload feature vectors") as raised:
        adapter.embed_items(items)

    assert type(raised.value) is Exception  # not a dl.exceptions type: catch Exception around embed_items
    (feature_set,) = platform.model_feature_sets(seeded.model["id"])
    assert platform.vectors(feature_set["id"]) == []


def test_a_502_is_retried_by_the_sdk_session(platform: LoopbackPlatform, seeded: SeededProject) -> None:
    platform.fail("GET", r"^/datasets/", status=502, times=1)

    dataset = dl.datasets.get(dataset_id=seeded.dataset["id"])

    assert dataset.id == seeded.dataset["id"]
    assert [c.status for c in platform.calls_to("GET", r"^/datasets/")] == [502, 200]


# ---------------------------------------------------------------------------------------------- metrics
def test_metrics_create_publishes_plot_samples(platform: LoopbackPlatform, seeded: SeededProject) -> None:
    model = dl.models.get(model_id=seeded.model["id"])

    ok = model.metrics.create(
        samples=[dl.PlotSample(figure="loss", legend="train", x=i, y=1.0 / (i + 1)) for i in range(3)],
        dataset_id=seeded.dataset["id"],
    )

    assert ok is True
    samples = platform.metrics(seeded.model["id"])
    assert [(s["figure"], s["legend"], s["data"]["x"]) for s in samples] == [("loss", "train", i) for i in range(3)]
    assert {s["datasetId"] for s in samples} == {seeded.dataset["id"]}


# -------------------------------------------------------------------------------------------- pipelines
def _template_pipeline(platform: LoopbackPlatform, edit: Callable[[dict], None]) -> dl.Pipeline:
    """The repository's template installed in a fresh project (app and active-learning installed), edited."""
    from loopback_platform.marketplace import install_active_learning

    dpk = json.loads((REPO / "pipeline_templates" / "clip-finetune-and-embed" / "dataloop.json").read_text())
    edit(dpk["components"]["pipelineTemplates"][0])
    pid = platform.add_project()["id"]
    platform.install_app(pid, json.loads((REPO / "dataloop.json").read_text()), REPO)
    install_active_learning(platform, pid)
    return dl.projects.get(project_id=pid).pipelines.get(pipeline_id=platform.install_template(pid, dpk)["id"])


def _node(template: dict, name: str) -> dict:
    return next(n for n in template["nodes"] if n["name"] == name)


@pytest.mark.parametrize(
    ("edit", "refusal"),
    [
        # the old template's last node: model management has no embed_dataset function
        (lambda t: _node(t, "Fine-tune CLIP")["namespace"].update(functionName="embed_dataset"),
         "node 'Fine-tune CLIP': model management has no function 'embed_dataset'"),
        (lambda t: _node(t, "Promote if better")["namespace"].update(functionName="promote"),
         "node 'Promote if better': app 'clip-finetune' declares no function clip_nodes.promote"),
        (lambda t: _node(t, "Promote if better")["namespace"].update(packageName="clip-finetuner"),
         "app 'clip-finetuner' is not installed"),
        (lambda t: _node(t, "Embed dataset")["namespace"].update(functionName="embed_subset"),
         "declares no pipeline node invoking clip_nodes.embed_subset"),
    ],
    ids=["ml-function", "custom-function", "custom-app", "not-a-node"],
)
def test_pipelines_naming_what_the_platform_cannot_run_are_refused(
    platform: LoopbackPlatform, edit: Callable[[dict], None], refusal: str
) -> None:
    pipeline = _template_pipeline(platform, edit)
    for start in (pipeline.install, pipeline.execute):
        with pytest.raises(dl.exceptions.BadRequest, match=re.escape(refusal)):
            start()
    assert platform.pipeline_executions == {}


def test_an_ml_node_whose_function_the_models_app_does_not_serve_fails_its_cycle(platform: LoopbackPlatform) -> None:
    """Model management offers predict, but this app declares no predict_items: the node fails when it runs."""
    pipeline = _template_pipeline(platform, lambda t: _node(t, "Fine-tune CLIP")["namespace"].update(
        functionName="predict"))
    dataset = platform.add_dataset(pipeline.project_id, "captions")["id"]
    pipeline.update_variables_values(**{"Dataset with captions": dataset, "Dataset to embed": dataset})
    pipeline.update()

    execution = pipeline.execute().wait()

    assert execution.status == "failed"
    error = platform.pipeline_executions[execution.id]["error"]
    assert error.startswith("node 'Fine-tune CLIP': the app of model 'openclip-vit-b-32_") and error.endswith(
        "serves no 'predict_items'")


def test_a_node_error_fails_the_cycle_with_its_message(platform: LoopbackPlatform) -> None:
    pipeline = _template_pipeline(platform, lambda t: None)  # the datasets are not set

    execution = pipeline.execute().wait()

    assert execution.status == "failed"
    error = platform.pipeline_executions[execution.id]["error"]
    assert error == "node 'Create New Model': variable 'Dataset with captions' has no value"


# ------------------------------------------------------------------------------------------ the stand-in
def test_faults_fail_drop_and_delay_apply_to_matching_requests_only(platform: LoopbackPlatform) -> None:
    project = platform.add_project()
    url = f"{platform.base_url}/projects/{project['id']}"
    platform.fail("GET", r"^/projects/", status=503, times=1)
    platform.drop("GET", r"^/projects/", times=1)
    platform.delay("GET", r"^/projects/", seconds=0.2, times=1)

    with requests.Session() as session:
        first = session.get(url, timeout=5)
        with pytest.raises(requests.ConnectionError):
            session.get(url, timeout=5)
        started = time.monotonic()
        third = session.get(url, timeout=5)
        elapsed = time.monotonic() - started
        assert session.get(f"{platform.base_url}/users/me", timeout=5).ok

    assert (first.status_code, third.status_code) == (503, 200)
    assert 0.2 <= elapsed < 2
    assert [c.fault for c in platform.calls_to("GET", r"^/projects/")] == ["status", "drop", None]


def test_unknown_routes_answer_404_and_are_recorded(platform: LoopbackPlatform) -> None:
    response = requests.post(f"{platform.base_url}/no/such/route", json={"a": 1}, timeout=5)

    assert response.status_code == 404
    assert [(c.method, c.path, c.json) for c in platform.unhandled] == [("POST", "/no/such/route", {"a": 1})]


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        ({"metadata.system.tags.train": True}, True),
        ({"metadata.system.tags.validation": True}, False),
        ({"$or": [{"name": "x"}, {"dir": {"$glob": "/images/*"}}]}, True),
        ({"dir": "/images*"}, True),
        ({"dir": "/imag"}, False),
        ({"id": {"$gte": "b", "$lte": "d"}}, True),
        ({"id": {"$gt": "c"}}, False),
        ({"metadata.user.score": {"$exists": False}}, True),
        ({"type": {"$in": ["dir", "file"]}}, True),
        ({"hidden": {"$ne": False}}, False),
        ({"tags": "b"}, True),  # a list field matches any element, as in Mongo
    ],
)
def test_dql_match(flt: dict[str, Any], expected: bool) -> None:
    doc = {
        "id": "c",
        "name": "0.png",
        "dir": "/images/train",
        "type": "file",
        "hidden": False,
        "tags": ["a", "b"],
        "metadata": {"system": {"tags": {"train": True}}, "user": {}},
    }

    assert dql_match(doc, flt) is expected


def test_dql_page_counts_with_page_size_zero() -> None:
    docs = [{"id": str(i)} for i in range(5)]

    assert dql_page(docs, {"pageSize": 0}) == {
        "items": [],
        "totalItemsCount": 5,
        "totalPagesCount": 0,
        "hasNextPage": False,
    }
    assert dql_page(docs, {"page": 1, "pageSize": 2})["items"] == [{"id": "2"}, {"id": "3"}]
