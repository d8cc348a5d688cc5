"""Push a saved model folder to a Hugging Face Hub model repository with huggingface_hub's own client.

What goes up: the open_clip files (open_clip_config.json, open_clip_model.safetensors), the model card
(README.md, rewritten first so it matches the folder), finetune_config.json, metrics.json, data_report.json, a
Hugging Face text tower's config and tokenizer files, and onnx/ when present. The training checkpoint and hidden
files stay local. Stock open_clip then loads it with `hf-hub:OWNER/REPO`.

The token comes from the environment (HF_TOKEN, or `hf auth login`'s stored token), the endpoint from
HF_ENDPOINT (a mirror or an enterprise Hub), read when the push runs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import ModelError
from .card import write_model_card
from .clip import is_artifact_dir

# the Hub's repo id rule: an optional namespace and a name of letters, digits, '-', '_' and '.', at most 96 long
REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
UPLOADED = ["*.json", "*.safetensors", "*.txt", "*.model", "README.md", "onnx/*"]
KEPT_LOCAL = ["checkpoint.pt", ".*", "*/.*", "report.html"]


def push_to_hub(model_dir: str | Path, repo_id: str, *, private: bool = False, token: str | None = None,
                commit_message: str = "Upload a fine-tuned CLIP model (clip-finetune)") -> str:
    """Create `repo_id` if needed and upload the saved model in `model_dir` to it; returns the commit's URL."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(model_dir).expanduser()
    if not isinstance(repo_id, str) or not REPO_ID.match(repo_id) or ".." in repo_id:
        raise ModelError(f"{repo_id!r} is not a Hub repository id; write OWNER/NAME (letters, digits, -, _ and .)")
    if not folder.is_dir() or not is_artifact_dir(folder) or not (folder / "open_clip_model.safetensors").is_file():
        raise ModelError(f"{str(folder)!r} is not a saved model folder (open_clip_config.json and "
                         "open_clip_model.safetensors); push a folder a training wrote")
    token = token or get_token()
    if not token:
        raise ModelError("no Hugging Face token: set HF_TOKEN to a token with write access "
                         "(https://huggingface.co/settings/tokens), or run `hf auth login`")
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    write_model_card(folder)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message=commit_message,
                                 allow_patterns=UPLOADED, ignore_patterns=KEPT_LOCAL)
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        raise ModelError(f"the Hub refused the push to {repo_id!r} (HTTP {status}): {str(e).splitlines()[0]}"
                         f"{'; check that HF_TOKEN can write to it' if status in (401, 403) else ''}") from None
    return str(info.commit_url if hasattr(info, "commit_url") else info)
