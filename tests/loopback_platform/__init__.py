"""A loopback stand-in of the Dataloop platform that the real dtlpy client talks to in tests.

`LoopbackPlatform` is an in-memory HTTP server on 127.0.0.1 (random port) that answers the routes dtlpy
1.126 uses for train/embed/evaluate flows and for pipelines (base path /api/v1). Seed it from Python
(`add_project`, `add_dataset`, `add_item`, `add_prompt_item`, `add_model`, `install_app`, `install_template`,
...), point dtlpy at it with
`dtlpy_pointed_at(server)` (or the `platform` fixture), run real SDK calls, then assert on what reached the
server: `server.calls`, `server.vectors(feature_set_id)`, `server.model(model_id)`, ...

Every request is recorded. A route the stand-in does not know answers 404 JSON and is also listed in
`server.unhandled`, so a test can assert that dtlpy needed nothing the stand-in lacks.

Faults for reliability tests: `server.fail(method, path_regex, status=500, times=1)`,
`server.drop(...)` (closes the connection without a reply), `server.truncate(..., keep=0.5)` (the body breaks off
after half its Content-Length) and `server.delay(..., seconds=...)`.

Fixture: `platform` (defined as `platform_fixture`; import that name into a test module or conftest.py).
dtlpy is imported lazily, so importing this package does not import dtlpy.

Modules, one job each:
- common.py: ids, timestamps, the test user and its token, JSON merging
- dql.py: the DQL query engine (match, sort, page) and the subset filter shape
- wire.py: what crosses the wire: the recorded Call, replies, HTTP errors, chunked and multipart bodies
- server.py: LoopbackPlatform itself: the HTTP server thread, fault injection, dispatch to a route
- store.py: the in-memory entities: inspection for tests, and the helpers that store and serve them
- seeding.py: add_project/add_dataset/add_item/... and seed_captioned_images, the image writer they use
- routes.py: the route table and its handlers (the REST API dtlpy calls)
- apps.py: installed apps (`install_app(project_id, manifest, root)`), their services, and running an app's
  function in process, as the platform's agent does (entities, progress, context)
- executions.py: executions of a service's function (service.execute, execution.wait) and model.train()
- triggers.py: installed apps' event triggers, fired when an item is created (and dataset.update)
- tasks.py: labelling tasks, their assignments, item statuses in a task, annotation updates
- pipelines.py: pipelines from a template (`install_template`), their checks, and execute() running the nodes
- registry.py: the app registry (`project.dpks.publish`), checking what a publish sends
- marketplace.py: Dataloop's active-learning app (Create New Model), re-written from its published code
- fixture.py: dtlpy_pointed_at and the `platform` fixture

Why not tests/platform/: tests/ has no __init__.py, so pytest (default "prepend" import mode) puts tests/
itself on sys.path and a package there is imported by its bare name. `platform` is the stdlib module's name:
pytest's own plugins (terminal, skipping) import the stdlib one before any test module, so
`from platform import LoopbackPlatform` fails there; and a process that imported tests/platform/ first
would hand it to every library that does `import platform` (requests, torch, ...). The package keeps the
name of the module it was split from, so no test's import changed.
"""

from __future__ import annotations

from .common import API_PREFIX, JSON, TEST_USER_EMAIL, make_token, new_id
from .dql import DqlError, dql_match, dql_page, dql_sort, tag_subset_filter
from .fixture import dtlpy_pointed_at, platform_fixture
from .seeding import SeededProject, image_bytes, png_bytes, seed_captioned_images
from .server import LoopbackPlatform
from .wire import Call

__all__ = [
    "API_PREFIX",
    "JSON",
    "TEST_USER_EMAIL",
    "Call",
    "DqlError",
    "LoopbackPlatform",
    "SeededProject",
    "dql_match",
    "dql_page",
    "dql_sort",
    "dtlpy_pointed_at",
    "image_bytes",
    "make_token",
    "new_id",
    "platform_fixture",
    "png_bytes",
    "seed_captioned_images",
    "tag_subset_filter",
]
