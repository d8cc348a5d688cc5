# syntax=docker/dockerfile:1
# An optional, faster runner image for the clip-finetune app: Dataloop's public GPU runner image (the one
# dataloop.json names for training) with requirements.txt already installed, so a service does not pip-install
# open_clip, timm and transformers at each cold start, and optionally the shipped models' weights baked in.
# The manifest as shipped does NOT need it: every runnerImage names a public Dataloop image, and the platform
# installs requirements.txt on top. The release workflow (.github/workflows/release.yml) builds and pushes this
# image on a version tag, and `python -m adapters.clip_finetune.dataloop.publish --image ...` points the manifest
# at it. No Docker daemon on the machines that built this repository: it was not built here (docs/dataloop.md).
#
#   docker build -t ghcr.io/<owner>/clip-finetune:0.1.0 .
#   docker build --build-arg BAKE_WEIGHTS=1 -t ghcr.io/<owner>/clip-finetune:0.1.0 .
#   docker push ghcr.io/<owner>/clip-finetune:0.1.0        # a public registry: Dataloop pulls without credentials
#
# Dataloop's three rules for images built on theirs (dtlpy-runner-images README): no USER (the base works for any
# user), ${DL_PYTHON_EXECUTABLE} -m pip (the base's interpreter), no ENV HOME=/tmp (the base sets it). The base's
# torch, torchvision, dtlpy, PyJWT, attrs and validators stay: requirements.txt names none of them
# (tests/test_base_image_install.py resolves it on the base's package set, docker/base-images/).
# The same image serves the CPU services (torch's CUDA build runs on the CPU); the manifest's CPU configs name
# Dataloop's CPU image only because it is the smaller pull.
FROM hub.dataloop.ai/dtlpy-runner-images/gpu:python3.11_cuda11.8_pytorch2

COPY requirements.txt /tmp/clip-finetune/requirements.txt
RUN ${DL_PYTHON_EXECUTABLE} -m pip install --no-cache-dir -r /tmp/clip-finetune/requirements.txt

# BAKE_WEIGHTS=1 also downloads the pretrained weights (and tokenizers) of the model entities dataloop.json ships
# into the image's Hugging Face cache (under the base's HOME), where open_clip looks first.
ARG BAKE_WEIGHTS=0
COPY dataloop.json /tmp/clip-finetune/dataloop.json
RUN <<'SH'
set -e
if [ "$BAKE_WEIGHTS" = "1" ]; then
${DL_PYTHON_EXECUTABLE} - <<'PY'
import json

import open_clip

for model in json.load(open("/tmp/clip-finetune/dataloop.json"))["components"]["models"]:
    config = model["configuration"]
    open_clip.create_model_and_transforms(config["model_name"], pretrained=config["pretrained"])
    open_clip.get_tokenizer(config["model_name"])
    print("baked", model["name"], config["model_name"], config["pretrained"])
PY
fi
SH
