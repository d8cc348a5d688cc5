"""Whether the pretrained weights a configuration names can be had: on disk (the Hugging Face cache, or
open_clip's URL cache), or from a reachable hub. Checked before open_clip tries to download, so a machine
that cannot reach the hub fails in a second with one message instead of a minute of retry warnings, and
a cached copy loads without touching the network."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import ParseResult, urlparse

import open_clip
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

from ..errors import ModelError, Setting

CONNECT_TIMEOUT = 3.0  # seconds to wait for the hub's TCP handshake: a reachable hub answers in well under one
URL_CACHE = Path("~/.cache/clip")  # where open_clip keeps weights it downloads by URL


@dataclass(frozen=True)
class WeightsSource:
    """Where open_clip gets the weights of a pretrained tag from, and whether they are here already."""

    where: str  # "hf-hub:<repo>" or the download URL
    host: str  # the host a download would contact
    cached: str | None  # the cached file, when there is one
    port: int = 443  # the port a download would contact: a mirror in HF_ENDPOINT may listen on another

    def describe(self) -> str:
        return f"{self.where} ({'cached at ' + self.cached if self.cached else 'not cached'})"


def weights_source(model_name: str, tag: str) -> WeightsSource | None:
    """The source of open_clip's pretrained tag `tag` of `model_name`; None when `tag` is not a known tag
    (a local weights file)."""
    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not cfg or cfg.get("file"):
        return None
    hub = cfg.get("hf_hub", "")
    if hub:  # open_clip prefers the hub when huggingface_hub is installed, as it is with this package
        repo, filename = os.path.split(hub)
        names = [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        cached = next((c for n in names if isinstance(c := try_to_load_from_cache(repo, n), str)), None)
        endpoint = urlparse(hf_constants.ENDPOINT)
        return WeightsSource(f"hf-hub:{repo}", endpoint.hostname or "huggingface.co", cached, _port(endpoint))
    url = cfg.get("url", "")
    local = URL_CACHE.expanduser() / os.path.basename(url)
    return WeightsSource(url, urlparse(url).hostname or "", str(local) if local.is_file() else None,
                         _port(urlparse(url)))


def _port(url: ParseResult) -> int:
    """The URL's port: the one it names, else its scheme's (80 for http, 443 otherwise); a malformed port 443."""
    try:
        port = url.port
    except ValueError:  # 'http://mirror:notaport': the download fails on its own, and says so
        port = None
    return port or (80 if url.scheme == "http" else 443)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set: the hub is not to be contacted."""
    return bool(hf_constants.HF_HUB_OFFLINE)


def reachable(host: str, port: int = 443, timeout: float = CONNECT_TIMEOUT) -> bool:
    """Whether a TCP connection to host:port opens within `timeout` (DNS failures answer at once)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def download_blocked(source: WeightsSource) -> str | None:
    """Why weights that are not cached cannot be downloaded now; None when the hub can be used."""
    if hub_offline():
        return "HF_HUB_OFFLINE is set"
    if not reachable(source.host, source.port):
        shown = source.host if source.port == 443 else f"{source.host}:{source.port}"
        return f"{shown} cannot be reached from this machine"
    return None


@contextlib.contextmanager
def weights_available(model_name: str, tag: str) -> Iterator[WeightsSource | None]:
    """Raise ModelError at once when the weights are neither cached nor downloadable; while a cached copy
    loads on a machine that cannot reach the hub, keep huggingface_hub offline (no retries, no warnings)."""
    source = weights_source(model_name, tag)
    why = download_blocked(source) if source is not None and source.cached is None else None
    if source is None or (source.cached is None and why is None):
        yield source
        return
    if source.cached is None:
        raise ModelError(
            f"pretrained={tag!r} of {model_name!r}: the weights ({source.where}) are not on this machine and "
            f"{why}. Download them once where the hub is reachable and copy the cache here "
            f"({hf_constants.HF_HUB_CACHE} or {URL_CACHE}), or point pretrained at a local weights file or a saved "
            "model folder ({pretrained}); {doctor} checks this",
            advice={"pretrained": Setting("pretrained", "/path/to/open_clip_model.safetensors"),
                    "doctor": Setting("doctor", plain="the doctor check (clip-finetune doctor)")},
        )
    before = hf_constants.HF_HUB_OFFLINE
    hf_constants.HF_HUB_OFFLINE = True  # read at call time by huggingface_hub: the cached file, no network
    try:
        yield source
    finally:
        hf_constants.HF_HUB_OFFLINE = before
