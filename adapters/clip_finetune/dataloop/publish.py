"""Publish a release of the app to Dataloop's app registry (the Marketplace), as the release workflow does:

    python -m adapters.clip_finetune.dataloop.publish --version 0.2.0 --project "My project" \\
        [--image ghcr.io/<owner>/clip-finetune:0.2.0] [--git-url https://github.com/<owner>/clip-finetune] [--dry-run]

Bumps the version everywhere (release.py), points every service at `--image` (without it the manifest keeps
Dataloop's public runner images), checks the manifests with dtlpy's loaders, writes them in place, then publishes
the app and each pipeline template with `project.dpks.publish`. With `--git-url` the platform clones the tag
`v<version>` (Dataloop's public apps declare a git codebase); without it dtlpy packs the folder and uploads it.
`--dry-run` writes the bumped manifests and publishes nothing. Logs in with DATALOOP_API_KEY when it is set,
else uses dtlpy's saved login.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import dtlpy as dl

from adapters.clip_finetune.dataloop.release import Release, bumped, load_release, validate, write
from adapters.clip_finetune.errors import ClipFinetuneError, ConfigError, user_errors


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m adapters.clip_finetune.dataloop.publish",
                                     description="Bump, check and publish the clip-finetune app and its templates.")
    parser.add_argument("--version", required=True, help="the release, MAJOR.MINOR.PATCH (tag v0.2.0 -> 0.2.0)")
    parser.add_argument("--image", help="runner image of every service (default: keep Dataloop's public images)")
    parser.add_argument("--git-url", help="the repository the platform clones at tag v<version> (default: upload "
                                          "the folder's code)")
    parser.add_argument("--project", help="Dataloop project to publish from (needed unless --dry-run)")
    parser.add_argument("--root", type=Path, default=Path("."), help="the repository's folder (default: .)")
    parser.add_argument("--dry-run", action="store_true", help="write the bumped manifests; publish nothing")
    return parser


def publish(release: Release, root: Path, project: dl.Project) -> list[dl.Dpk]:
    """Publish the app, then each template (they depend on it); the published DPKs, as the registry answered."""
    targets = [(release.app, root), *((t, path.parent) for path, t in release.templates.items())]
    published = []
    for manifest, folder in targets:
        dpk = dl.Dpk.from_json(_json=manifest, client_api=dl.client_api, project=project)
        try:
            published.append(project.dpks.publish(dpk=dpk, local_path=str(folder.resolve())))
        # dtlpy raises ExceptionMain subclasses (Conflict, BadRequest, ...) for the statuses it knows, else
        # PlatformException; both carry the status and the registry's message
        except (dl.exceptions.ExceptionMain, dl.exceptions.PlatformException) as e:
            raise ClipFinetuneError(f"the app registry refused {manifest['name']} {manifest['version']}: "
                                    f"{e.status_code} {e.message}") from e
    return published


def _project(name: str | None) -> dl.Project:
    if not name:
        raise ConfigError("--project: name the Dataloop project to publish from (or use --dry-run)")
    if os.environ.get("DATALOOP_API_KEY"):
        dl.login_api_key(api_key=os.environ["DATALOOP_API_KEY"])
    elif dl.token_expired():
        raise ConfigError("not logged in to Dataloop: set DATALOOP_API_KEY (an API key of the publishing project) "
                          "or log in with dtlpy first (python -c 'import dtlpy; dtlpy.login()')")
    try:
        return dl.projects.get(project_name=name)
    except dl.exceptions.NotFound as e:
        raise ConfigError(f"--project {name!r}: no such project for this login; check the name") from e


def run(args: argparse.Namespace) -> list[str]:
    """The command's work; the lines it reports."""
    root = args.root
    release = bumped(load_release(root), args.version, image=args.image, git_url=args.git_url)
    validate(release)
    project = None if args.dry_run else _project(args.project)
    written = write(release, root)
    lines = [f"wrote {path}" for path in written]
    if project is None:
        return [*lines, f"dry run: {release.app['name']} {args.version} not published"]
    for dpk in publish(release, root, project):
        lines.append(f"published {dpk.name} {dpk.version} (id {dpk.id}) in project {project.name}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with user_errors():
            for line in run(args):
                print(line)
    except ClipFinetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
