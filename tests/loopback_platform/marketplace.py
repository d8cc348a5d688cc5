"""Marketplace apps the templates use that the stand-in cannot run from a checkout, with the behaviour of their
published code re-written here (their repositories carry no licence to copy the code itself).

active-learning 0.1.41 (github.com/dataloop-ai-apps/active-learning, dataloop.json and
modules/create_new_model.py at commit 6d625c76): the "Create New Model" pipeline node. Only what the templates
here use is kept: the manifest's module, function and pipelineNodes entries, and create_new_model.
"""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING, Any

from .apps import App

if TYPE_CHECKING:
    from .server import LoopbackPlatform

ACTIVE_LEARNING: dict[str, Any] = {
    "name": "active-learning",
    "version": "0.1.41",
    "components": {
        "pipelineNodes": [{"name": "createNewModel", "displayName": "Create New Model", "scope": "node",
                           "invoke": {"type": "function",
                                      "namespace": "create-new-model.create_new_model.create_new_model"}}],
        "modules": [{
            "name": "create_new_model", "computeConfig": "create-new-model", "initInputs": [],
            "entryPoint": "modules/create_new_model.py", "className": "ModelCreator",
            "functions": [{
                "name": "create_new_model",
                "input": [{"name": "base_model", "type": "Model"}, {"name": "dataset", "type": "Dataset"},
                          {"name": "train_subset", "type": "Json"}, {"name": "validation_subset", "type": "Json"},
                          {"name": "model_configuration", "type": "Json"}],
                "output": [{"name": "new_model", "type": "Model"}, {"name": "base_model", "type": "Model"}],
            }],
        }],
    },
}


def create_new_model(base_model: Any, dataset: Any, train_subset: dict | None, validation_subset: dict | None,
                     model_configuration: dict | None, context: Any) -> tuple[Any, Any]:
    """active-learning's ModelCreator.create_new_model: the base model's configuration with the given keys
    merged over it, cloned under the node's name template (Python expressions in braces, evaluated with
    base_model, dataset and datetime), on the dataset with the two subset filters, status "created"."""
    import dtlpy as dl

    if base_model is None or dataset is None:
        raise ValueError("Base model and dataset are required.")
    configuration = base_model.configuration
    configuration.update(model_configuration or {})
    try:
        name = context.node.metadata["customNodeConfig"]["modelName"]
    except (KeyError, TypeError, AttributeError):
        name = f"{base_model.name}_{datetime.datetime.now().strftime('%Y_%m_%d-T%H_%M_%S')}"
    namespace = {"__builtins__": {}, "base_model": base_model, "dataset": dataset, "datetime": datetime}
    while "{" in name:
        start, rest = name.split("{", 1)
        expression, end = rest.split("}", 1)
        try:  # as the app does; without builtins, strftime's own import fails and the part comes out empty
            value = str(eval(expression, namespace)) if expression else ""
        except Exception:
            value = ""
        name = start + value + end
    # the app reads the base model's subsets when a subset is empty, but clones with the given (empty) one
    i = 1
    while True:
        try:
            new_model = base_model.clone(model_name=name, project_id=dataset.project.id, dataset=dataset,
                                         configuration=configuration,
                                         train_filter=dl.Filters(custom_filter=train_subset),
                                         validation_filter=dl.Filters(custom_filter=validation_subset),
                                         status="created")
            return new_model, base_model
        except dl.exceptions.BadRequest:  # the name is taken
            name, i = f"{name}_v{i}", i + 1


def install_active_learning(platform: LoopbackPlatform, project_id: str) -> App:
    """Install the active-learning app in a project, its Create New Model node run from create_new_model above."""
    app = platform.install_app(project_id, ACTIVE_LEARNING)
    app.callables[("create_new_model", "create_new_model")] = create_new_model
    return app
