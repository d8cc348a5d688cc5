"""Seeding the stand-in from Python: projects, datasets, items, prompt items, models, pipelines; a whole
captioned project in one call; and the image writer tests use for item content."""

from __future__ import annotations

import copy
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .common import JSON, TEST_USER_EMAIL, _deep_merge, _now, new_id
from .dql import tag_subset_filter

if TYPE_CHECKING:
    from PIL import Image

    from .server import LoopbackPlatform


class Seeding:
    """Mixed into LoopbackPlatform (server.py): what a test adds before dtlpy looks."""

    # ---------------------------------------------------------------- seeding
    def add_project(self, name: str = "loopback-project") -> JSON:
        """A project plus its hidden system dataset "Binaries" (where model artifacts are uploaded)."""
        with self._lock:
            pid = new_id()
            self.projects[pid] = {
                "id": pid,
                "name": name,
                "org": {"id": "loopback-org", "name": "loopback-org"},
                "creator": TEST_USER_EMAIL,
                "createdAt": _now(),
                "updatedAt": _now(),
                "url": f"{self.base_url}/projects/{pid}",
                "role": "owner",
                "accountId": "loopback-account",
            }
            self._new_dataset(pid, "Binaries", system=True)
            return self.project(pid)

    def add_dataset(self, project_id: str, name: str) -> JSON:
        with self._lock:
            return self.dataset(self._new_dataset(project_id, name)["id"])

    def add_item(
        self,
        dataset_id: str,
        content: bytes | str | os.PathLike[str],
        remote_path: str,
        description: str | None = None,
        metadata: JSON | None = None,
        annotations: Sequence[JSON] | None = None,
        tags: Sequence[str] | None = None,
        mimetype: str | None = None,
        hidden: bool = False,
    ) -> JSON:
        """Store an item; `content` is bytes or a local file path. Returns the item JSON.

        `tags` become `metadata.system.tags.<tag> = true` (how Dataloop marks ML subsets); `annotations`
        are partial annotation JSONs ({"type", "label", "coordinates", "metadata"}) completed here.
        """
        data = content if isinstance(content, bytes) else Path(content).read_bytes()
        with self._lock:
            item = self._store_item(dataset_id, remote_path, data, mimetype=mimetype)
            item["hidden"] = hidden
            if description is not None:
                item["description"] = description
            _deep_merge(item["metadata"], copy.deepcopy(metadata or {}))
            for tag in tags or ():
                item["metadata"]["system"].setdefault("tags", {})[tag] = True
            for ann in annotations or ():
                self._new_annotation(item["id"], ann)
            return self._item_json(item["id"])

    def add_annotation(self, item_id: str, annotation: JSON) -> JSON:
        with self._lock:
            return copy.deepcopy(self._new_annotation(item_id, annotation))

    def add_prompt_item(
        self,
        dataset_id: str,
        remote_path: str,
        prompts: Sequence[JSON],
        tags: Sequence[str] | None = None,
        metadata: JSON | None = None,
    ) -> JSON:
        """A prompt item as Dataloop stores it: a JSON file with shebang dltype "prompt".

        Each prompt dict: {"image": stream URL | item id | external URL, "text": optional user text,
        "caption": optional str or list of str}. Captions become free-text annotations (type "text",
        label "free-text", coordinates = caption, metadata.system.promptId = "<n>"), as the platform stores
        reviewed responses; the caption is never inside the JSON file.
        """
        body: JSON = {"shebang": "dataloop", "metadata": {"dltype": "prompt"}, "prompts": {}}
        captions: list[tuple[str, str]] = []
        for n, prompt in enumerate(prompts, start=1):
            elements: list[JSON] = []
            if prompt.get("image") is not None:
                elements.append({"mimetype": "image/*", "value": prompt["image"]})
            if prompt.get("text") is not None:
                elements.append({"mimetype": "application/text", "value": prompt["text"]})
            elements.append({"mimetype": "metadata", "value": {"role": "user"}})
            body["prompts"][str(n)] = elements
            caption = prompt.get("caption")
            for text in [caption] if isinstance(caption, str) else caption or []:
                captions.append((str(n), text))
        meta = _deep_merge({"system": {"shebang": {"dltype": "prompt"}}}, copy.deepcopy(metadata or {}))
        annotations = [
            {"type": "text", "label": "free-text", "coordinates": text, "metadata": {"system": {"promptId": pid}}}
            for pid, text in captions
        ]
        return self.add_item(
            dataset_id,
            json.dumps(body).encode(),
            remote_path,
            metadata=meta,
            annotations=annotations,
            tags=tags,
            mimetype="application/json",
        )

    def add_model(
        self,
        project_id: str,
        name: str,
        configuration: JSON | None = None,
        dataset_id: str | None = None,
        subsets: dict[str, JSON] | None = None,
        artifacts: dict[str, bytes] | None = None,
        status: str = "pre-trained",
        input_type: str = "image",
        output_type: str = "embedding",
        package_id: str | None = None,
        module_name: str = "model-module",
    ) -> JSON:
        """A model entity. `subsets`: {"train": DQL filter, ...} (a bare filter gets wrapped in {"filter"}).

        `artifacts` ({file name: bytes}) are stored where dtlpy puts them: the project's Binaries dataset
        under /artifacts/models/<model name>/, referenced as {"type": "item", "itemId"}.
        """
        with self._lock:
            mid = new_id()
            package_id = package_id or new_id()
            # a model always belongs to a package (its app): dtlpy before 1.126 fetches it when an adapter loads
            self.packages.setdefault(package_id, {
                "id": package_id, "name": f"model-package-{package_id[-6:]}", "projectId": project_id, "type": "ml",
                "modules": [], "creator": TEST_USER_EMAIL, "createdAt": _now(),
                "url": f"{self.base_url}/packages/{package_id}"})
            subsets_json = {k: (v if "filter" in v else {"filter": v}) for k, v in (subsets or {}).items()}
            binaries = self.binaries_dataset(project_id)["id"]
            refs = [
                {"type": "item", "itemId": self._store_item(binaries, f"/artifacts/models/{name}/{fname}", data)["id"]}
                for fname, data in (artifacts or {}).items()
            ]
            self.models[mid] = {
                "id": mid,
                "name": name,
                "status": status,
                "datasetId": dataset_id,
                "packageId": package_id,
                "projectId": project_id,
                "context": {"project": project_id, "org": "loopback-org"},
                "configuration": copy.deepcopy(configuration or {}),
                "metadata": {"system": {"subsets": subsets_json}},
                "artifacts": refs,
                "inputType": input_type,
                "outputType": output_type,
                "moduleName": module_name,
                "scope": "project",
                "version": "1.0.0",
                "labels": [],
                "tags": [],
                "description": "",
                "creator": TEST_USER_EMAIL,
                "createdAt": _now(),
                "updatedAt": _now(),
                "url": f"{self.base_url}/ml/models/{mid}",
            }
            self.model_status_log[mid] = [status]
            return self.model(mid)

    def add_pipeline(
        self,
        project_id: str,
        name: str,
        nodes: list[JSON] | None = None,
        connections: list[JSON] | None = None,
        variables: list[JSON] | None = None,
    ) -> JSON:
        with self._lock:
            pid = new_id()
            self.pipelines[pid] = {
                "id": pid,
                "name": name,
                "projectId": project_id,
                "orgId": "loopback-org",
                "nodes": nodes or [],
                "connections": connections or [],
                "variables": variables or [],
                "startNodes": [],
                "status": "Installed",
                "creator": TEST_USER_EMAIL,
                "createdAt": _now(),
                "updatedAt": _now(),
                "url": f"{self.base_url}/pipelines/{pid}",
            }
            return copy.deepcopy(self.pipelines[pid])


# ------------------------------------------------------------------------------------------ item content
def image_bytes(image: Image.Image, fmt: str = "PNG", **save_kw: Any) -> bytes:
    """The file content of a PIL image in `fmt` (PNG by default); `save_kw` go to Image.save (quality, exif...)."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_kw)
    return buffer.getvalue()


def png_bytes(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (8, 6)) -> bytes:
    """A tiny solid-colour PNG."""
    from PIL import Image

    return image_bytes(Image.new("RGB", size, color))


@dataclass
class SeededProject:
    """What `seed_captioned_images` created: ids, and the item JSONs per subset tag."""

    project: JSON
    dataset: JSON
    items: dict[str, list[JSON]]
    model: JSON | None = None


def seed_captioned_images(
    server: LoopbackPlatform,
    n_train: int = 3,
    n_validation: int = 2,
    n_untagged: int = 1,
    model_name: str | None = None,
    model_configuration: JSON | None = None,
) -> SeededProject:
    """A project with one dataset of tiny PNGs captioned by `description`, tagged train/validation.

    Each image also carries a free-text annotation with its caption. With `model_name`, a model whose
    subsets select the train/validation tags (the reference template's filters) is created too.
    """
    project = server.add_project()
    dataset = server.add_dataset(project["id"], "captioned-images")
    items: dict[str, list[JSON]] = {"train": [], "validation": [], "untagged": []}
    counts = {"train": n_train, "validation": n_validation, "untagged": n_untagged}
    for subset, count in counts.items():
        for i in range(count):
            caption = f"a {subset} picture number {i}"
            items[subset].append(
                server.add_item(
                    dataset["id"],
                    png_bytes((40 * i % 256, 80, 160 if subset == "train" else 20)),
                    f"/images/{subset}/{i}.png",
                    description=caption,
                    tags=[] if subset == "untagged" else [subset],
                    annotations=[{"type": "text", "label": "free-text", "coordinates": caption}],
                )
            )
    model = None
    if model_name is not None:
        model = server.add_model(
            project["id"],
            model_name,
            model_configuration or {},
            dataset["id"],
            subsets={"train": tag_subset_filter("train"), "validation": tag_subset_filter("validation")},
        )
    return SeededProject(project, dataset, items, model)
