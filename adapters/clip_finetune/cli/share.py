"""`clip-finetune export-hf` and `clip-finetune push`: a saved model for transformers, and on the Hugging Face Hub."""

from __future__ import annotations

import argparse
from typing import Any


def add_share_parsers(sub: Any) -> None:
    p = sub.add_parser("export-hf", help="export a saved model as a transformers CLIPModel folder",
                       description="Write a folder that transformers.CLIPModel.from_pretrained and "
                       "CLIPProcessor.from_pretrained load, with embeddings equal to this model's (both towers). "
                       "For open_clip's CLIP with a ViT image tower and its own text transformer (ViT-B-32, "
                       "ViT-B-16, ViT-L-14, ...); other architectures are refused with the reason.")
    p.add_argument("model", metavar="MODEL", help="saved model folder")
    p.add_argument("out", metavar="OUT", help="output folder (new or empty)")
    p = sub.add_parser("push", help="upload a saved model to a Hugging Face Hub repository",
                       description="Create the model repository if needed and upload the saved model: weights, "
                       "open_clip config, model card (README.md), metrics and data report; the checkpoint stays "
                       "local. The token is read from HF_TOKEN (or `hf auth login`), the endpoint from HF_ENDPOINT. "
                       "open_clip loads the result with hf-hub:OWNER/NAME.")
    p.add_argument("model", metavar="MODEL", help="saved model folder")
    p.add_argument("repo_id", metavar="REPO_ID", help="the Hub repository, OWNER/NAME")
    p.add_argument("--private", action="store_true", help="create the repository as private")


def cmd_export_hf(args: argparse.Namespace) -> int:
    from ..model.hf_export import export_hf

    out = export_hf(args.model, args.out)
    print(f"exported {args.model} to {out}: load it with transformers.CLIPModel.from_pretrained({str(out)!r})")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from ..model.hub_push import push_to_hub

    url = push_to_hub(args.model, args.repo_id, private=args.private)
    print(f"pushed {args.model} to {args.repo_id}: {url}")
    return 0


SHARE_COMMANDS = {"export-hf": cmd_export_hf, "push": cmd_push}
