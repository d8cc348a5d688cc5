# syntax=docker/dockerfile:1
# The runner image of every service of the clip-finetune app: dataloop.json names it in each computeConfig's
# runtime.runnerImage, so a service starts with its runtime installed instead of pip-installing torch, open_clip,
# timm and transformers at every cold start. The pins are the versions the test suite runs with; pyproject.toml
# declares the floors (bench/min_versions.py checks them) and tests/test_runtime_pins.py keeps the three agreeing.
# requirements.txt, which the platform installs on top at each service start, adds only this package.
#
#   docker build -t gcr.io/viewo-g/piper/agent/runner/apps/clip-finetune:0.1.0 .
#   docker build --build-arg BAKE_WEIGHTS=1 -t gcr.io/viewo-g/piper/agent/runner/apps/clip-finetune:0.1.0 .
#   docker push gcr.io/viewo-g/piper/agent/runner/apps/clip-finetune:0.1.0
#
# BAKE_WEIGHTS=1 also downloads the pretrained weights (and tokenizers) of the model entities dataloop.json ships,
# into the image's Hugging Face cache, where open_clip looks first: no download when a service loads them.
# Dataloop's GPU runner images bring CUDA 11.8 and a driver-facing runtime; the torch wheel below brings its own
# CUDA libraries (docs/dataloop.md: what this assumes of the nodes' driver).
FROM hub.dataloop.ai/dtlpy-runner-images/gpu:python3.11_cuda11.8_pytorch2

USER 1000
ENV HOME=/tmp \
    HF_HOME=/tmp/.cache/huggingface \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install --no-cache-dir --user \
    torch==2.14.1 \
    torchvision==0.29.1 \
    open_clip_torch==3.3.0 \
    dtlpy==1.126.5 \
    transformers==5.24.0 \
    timm==1.0.31 \
    numpy==2.4.6 \
    pillow==13.0.0 \
    pydantic==2.14.4 \
    tqdm==4.70.1 \
    safetensors==0.8.0 \
    charset-normalizer==3.5.3 \
    matplotlib==3.11.2

ARG BAKE_WEIGHTS=0
COPY dataloop.json /tmp/clip-finetune/dataloop.json
RUN <<'SH'
set -e
if [ "$BAKE_WEIGHTS" = "1" ]; then
python3 - <<'PY'
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
