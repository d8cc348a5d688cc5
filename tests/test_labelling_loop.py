"""Failed searches back to labelling (docs/labelling-loop.md), through the loopback platform and the real dtlpy
client: the app's search functions log each search with its scored results; the failed ones become a labelling
task of prompt items (the right items, the assignees); the annotators' answers come back as training pairs that
the next training run reads and counts in its data report."""

from __future__ import annotations

import json
import re
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dtlpy as dl
import pytest
from helpers import QUICK_CONFIG, REPO, image_bytes
from loopback_platform import JSON, LoopbackPlatform, dtlpy_pointed_at, tag_subset_filter

from adapters.clip_finetune.data.synthetic import SyntheticSample, render
from adapters.clip_finetune.dataloop import labelling, search_log
from adapters.clip_finetune.dataloop.adapter import ClipAdapter
from adapters.clip_finetune.errors import DataError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

APP = json.loads((REPO / "dataloop.json").read_text())
COLOURS = ("red", "yellow", "green", "blue", "orange", "purple")
ANNOTATORS = ["ann@loopback.local", "bea@loopback.local"]


@dataclass
class Catalogue:
    platform: LoopbackPlatform
    project_id: str
    dataset_id: str
    model_id: str
    service: dl.Service

    def run(self, function: str, **inputs: object) -> object:
        execution = self.service.execute(function_name=function, project_id=self.project_id, execution_input={
            "dataset": {"dataset_id": self.dataset_id}, **inputs}).wait()
        assert execution.latest_status["status"] == "success", execution.latest_status
        return execution.output

    @property
    def dataset(self) -> dl.Dataset:
        return dl.datasets.get(dataset_id=self.dataset_id)


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Catalogue]:
    """Six captioned circles (three train, three validation) embedded by the app's Embed dataset function, which
    records the dataset's search model."""
    with LoopbackPlatform() as platform, pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("labelling"))
        with dtlpy_pointed_at(platform):
            pid = platform.add_project()["id"]
            dataset = platform.add_dataset(pid, "catalogue")
            for n, colour in enumerate(COLOURS):
                attributes = {"colour": colour, "shape": "circle", "size": "large", "position": "centre",
                              "background": "white"}
                spec = SyntheticSample(attributes, f"a {colour} circle", (f"a {colour} circle",),
                                       zlib.crc32(colour.encode()))
                platform.add_item(dataset["id"], image_bytes(render(spec)), f"/{colour}.png",
                                  description=f"a {colour} circle", tags=["train" if n < 3 else "validation"])
            app = platform.install_app(pid, APP, REPO)
            model_id = platform.add_model(
                pid, "clip-tiny", {**QUICK_CONFIG, "max_steps": 2}, dataset["id"], package_id=app.id,
                module_name="clip-finetune-module",
                subsets={"train": tag_subset_filter("train"), "validation": tag_subset_filter("validation")})["id"]
            service = dl.services.get(service_id=platform.service_for(app, "clip_nodes", "clip-nodes")["id"])
            shop = Catalogue(platform, pid, dataset["id"], model_id, service)
            shop.run("embed_dataset", model={"model_id": model_id})
            yield shop


@pytest.fixture
def shop(catalogue: Catalogue) -> Iterator[Catalogue]:
    with dtlpy_pointed_at(catalogue.platform):
        yield catalogue


# ------------------------------------------------------------------------------------------- which failed
@pytest.mark.parametrize(("entry", "expected"), [
    ({"results": [{"id": "a", "score": 0.31}]}, []),
    ({"results": [{"id": "a", "score": 0.12}]}, ["top score 0.120 < 0.25"]),
    ({"results": []}, ["nothing found"]),
    ({"results": None}, []),  # results unknown (not read): no failure by score
    ({"results": [{"id": "a", "score": 0.9}], "feedback": {"wrong": True}}, ["marked wrong"]),
    ({"results": [{"id": "a", "score": 0.1}], "feedback": {"accepted": ["a"]}}, []),
])
def test_a_search_fails_when_judged_wrong_empty_or_below_the_score(entry: JSON, expected: list[str]) -> None:
    assert labelling.failure_reasons(entry, 0.25, require_accept=False) == expected


def test_failed_queries_group_a_texts_searches_and_an_accept_clears_it() -> None:
    entries = [
        {"text": "A red  dress", "results": [{"id": "i1", "score": 0.1}, {"id": "i2", "score": 0.05}]},
        {"text": "a red dress", "results": [{"id": "i3", "score": 0.2}, {"id": "i1", "score": 0.1}]},
        {"text": "shoes", "results": [{"id": "i4", "score": 0.1}]},
        {"text": "shoes", "results": [{"id": "i4", "score": 0.1}], "feedback": {"accepted": ["i4"]}},
        {"text": "hats", "results": [{"id": "i5", "score": 0.4}]},
    ]
    (failed,) = labelling.failed_queries(entries, min_top_score=0.25)
    assert failed.text == "a red dress" and failed.searches == 2
    assert failed.candidates == ["i1", "i3", "i2"]  # best rank first, each once
    assert failed.top_score == 0.2 and failed.reasons == ["top score 0.100 < 0.25", "top score 0.200 < 0.25"]
    assert [q.text for q in labelling.failed_queries(entries[4:], 0.25, require_accept=True)] == ["hats"]


@pytest.mark.parametrize(("config", "message"), [
    ({"min_score": 0.2}, "unknown keys ['min_score']"),
    ({"min_top_score": 2}, "min_top_score must be a cosine from -1 to 1 (got 2)"),
    ({"candidates_per_query": 0}, "candidates_per_query must be an integer >= 1 (got 0)"),
])
def test_a_bad_labelling_config_names_the_key(config: JSON, message: str) -> None:
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")):
        labelling.settings(config)


def test_a_task_without_assignees_is_refused_before_anything_is_made() -> None:
    failed = [labelling.FailedQuery("a red dress", ["marked wrong"], ["0" * 24])]
    with pytest.raises(DataError, match="name at least one assignee"):
        labelling.queries_to_labelling(None, failed, [])  # no dataset touched: it fails first


# ------------------------------------------------------------------------------------------- the search log
def test_each_search_through_the_app_is_logged_with_its_scored_results(shop: Catalogue) -> None:
    before = len(search_log.read(shop.dataset))
    answer = shop.run("embed_query", text="a green circle", model_id="")
    found = shop.run("search_items", model={"model_id": shop.model_id}, text="a blue circle", k=3)
    entries = search_log.read(shop.dataset)[before:]
    assert [e["text"] for e in entries] == ["a green circle", "a blue circle"]
    assert [e["id"] for e in entries] == [answer["search_id"], found["search_id"]]
    panel, sdk = entries
    assert panel["source"] == "panel" and panel["model_id"] == shop.model_id and panel["time"]
    assert len(panel["results"]) == len(COLOURS)  # every embedded image, ranked by the platform
    assert [r["id"] for r in sdk["results"]] == [i["id"] for i in found["items"]]  # what the caller was shown
    scores = [r["score"] for r in panel["results"]]
    assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)
    vector = answer["vector"]  # the score is the cosine of the query vector and the item's stored vector
    stored = {v["entityId"]: v["value"] for v in shop.platform.vectors(answer["feature_set_id"])}
    top = panel["results"][0]
    assert top["score"] == pytest.approx(sum(a * b for a, b in zip(vector, stored[top["id"]], strict=True)), abs=1e-5)
    logged = [i for i in shop.platform.dataset_items(shop.dataset_id) if i["dir"] == search_log.LOG_DIR]
    assert logged and all(i["hidden"] for i in logged)  # out of the browser and of every subset filter


def test_racing_searches_keep_every_entry_and_the_log_keeps_the_newest(shop: Catalogue) -> None:
    dataset, before = shop.dataset, len(search_log.read(shop.dataset))
    entries = [search_log.new_entry(dataset.id, f"race {n}", {}, [], "test") for n in range(6)]
    threads = [threading.Thread(target=search_log.record, args=(dataset, e, 10_000)) for e in entries]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    texts = [e["text"] for e in search_log.read(dataset)]
    assert sorted(t for t in texts if t.startswith("race")) == [f"race {n}" for n in range(6)]
    assert len(texts) == before + 6
    newest = search_log.new_entry(dataset.id, "newest", {}, [], "test")
    search_log.record(dataset, newest, max_entries=3)
    assert [e["text"] for e in search_log.read(dataset)][-1] == "newest"
    assert len(search_log.read(dataset)) == 3


def test_feedback_marks_a_logged_search_wrong(shop: Catalogue) -> None:
    answer = shop.run("embed_query", text="a yellow circle", model_id="")
    shop.run("search_feedback", search_id=answer["search_id"], accepted=None, wrong=True)
    (entry,) = [e for e in search_log.read(shop.dataset) if e["id"] == answer["search_id"]]
    assert entry["feedback"]["wrong"] is True and entry["text"] == "a yellow circle" and entry["results"]
    with pytest.raises(DataError, match="has no search 'nope'"):
        search_log.record_feedback(shop.dataset, "nope", wrong=True)


# ------------------------------------------------------------------------------------------- the loop
def _answer(platform: LoopbackPlatform, task_id: str, item_id: str, text: str | None, status: str) -> None:
    """What an annotator does in the studio, through dtlpy: a free-text answer to prompt 1, then the status."""
    item = dl.items.get(item_id=item_id)
    if text is not None:
        item.annotations.upload([dl.Annotation.new(item=item, annotation_definition=dl.FreeText(text=text),
                                                   metadata={"system": {"promptId": "1"}})])
    item.update_status(status=status, task_id=task_id)


def test_failed_queries_become_a_task_whose_answers_the_next_run_trains_on(shop: Catalogue, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    config = {"min_top_score": 1.0, "candidates_per_query": 2, "task_name": "failed searches"}  # all fail
    queries = ["a pink circle", "a round thing"]
    summary = shop.run("queries_to_labelling", assignees=ANNOTATORS, queries=queries, config=config)
    assert summary["failed_queries"] == queries and summary["items"] == 4
    (task,) = shop.platform.tasks.values()
    assert task["name"] == "failed searches" and task["id"] == summary["task_id"]
    assignments = shop.platform.task_assignments(task["id"])
    assert sorted(a["annotator"] for a in assignments) == ANNOTATORS
    assert [a["totalItems"] for a in assignments] == [2, 2]  # dealt out in equal shares
    items = shop.platform.task_items(task["id"])
    made = [i for i in shop.platform.dataset_items(shop.dataset_id) if i["dir"] == labelling.LABELLING_DIR]
    assert sorted(i["id"] for i in items) == sorted(i["id"] for i in made)  # the task holds the prompt items made
    logged = {e["text"]: e for e in search_log.read(shop.dataset)}  # the given queries were searched and logged
    for item in items:
        query = item["metadata"]["user"]["clip_finetune"]["labelling"]["query"]
        prompt = json.loads(shop.platform.item_bytes(item["id"]))["prompts"]["1"]
        image = next(e["value"] for e in prompt if e["mimetype"].startswith("image"))
        text = next(e["value"] for e in prompt if e["mimetype"] == "application/text")
        top = [r["id"] for r in logged[query]["results"][:2]]
        assert image.rsplit("/", 2)[-2] in top and f'"{query}"' in text  # the query's top images, the query
    assert shop.run("queries_to_labelling", assignees=ANNOTATORS, queries=queries, config=config)["task_id"] is None

    by_query = sorted(items, key=lambda i: (i["metadata"]["user"]["clip_finetune"]["labelling"]["query"], i["id"]))
    answers = [("yes", "completed"), ("a yellow circle on white", "completed"), ("no", "completed"),
               (None, "discard")]
    for item, (text, status) in zip(by_query, answers, strict=True):
        _answer(shop.platform, task["id"], item["id"], text, status)
    harvested = shop.run("labelling_to_pairs", task_id="")
    assert harvested["pairs"] == 2 and harvested["tasks"][0]["answered_yes"] == 1
    assert harvested["tasks"][0]["skipped"] == {'answered "no" without saying what the image shows': 1, "discarded": 1}
    yes_item = by_query[0]
    (answer,) = shop.platform.item_annotations(yes_item["id"])
    assert answer["coordinates"] == "a pink circle"  # "yes" is now the query it answered
    assert shop.run("labelling_to_pairs", task_id=task["id"])["pairs"] == 0  # a second harvest adds nothing

    monkeypatch.chdir(tmp_path)  # train_model downloads under ./tmp/<model id>/
    ClipAdapter().train_model(dl.models.get(model_id=shop.model_id))
    report = json.loads(shop.platform.artifact_files(shop.model_id)["data_report.json"])
    assert report["train"]["from_labelling"] == 2 and report["train"]["used"] == 3 + 2
    assert "from_labelling" not in report["validation"]


def test_the_docs_sdk_block_runs_as_written(shop: Catalogue, capsys: pytest.CaptureFixture) -> None:
    """docs/labelling-loop.md's "From the SDK" block, its dataset id filled in, on the searches logged above."""
    blocks = re.findall(r"^```python\n(.*?)^```", (REPO / "docs" / "labelling-loop.md").read_text(), re.S | re.M)
    (block,) = [b for b in blocks if "harvest_all" in b]
    tasks_before = set(shop.platform.tasks)
    exec(compile(block.replace("<dataset id>", shop.dataset_id), "labelling-loop.md", "exec"), {})
    (new_task,) = set(shop.platform.tasks) - tasks_before
    made, failed = capsys.readouterr().out.splitlines()[0].split(" items to label for ")
    assert made.split() == [new_task, str(len(shop.platform.task_items(new_task)))] and int(failed.split()[0]) >= 1
    assignments = shop.platform.task_assignments(new_task)
    assert [a["annotator"] for a in assignments] == ["annotator@example.com"]
