"""The plain open_clip loop a user writes to embed a folder, as a whole process (the peer of `clip-finetune embed`
in `python -m bench.embed`): PIL open + convert, the model's preprocess, encode_image per batch, np.savez.

    python -m bench.plain_embed MODEL_DIR IMAGE_FOLDER OUT.npz [BATCH]
"""

import sys
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image


def main() -> None:
    model_dir, folder, out = sys.argv[1:4]
    batch = int(sys.argv[4]) if len(sys.argv) > 4 else 64
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    model.eval()
    paths = sorted(str(p) for p in Path(folder).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    vectors = []
    with torch.no_grad():
        for start in range(0, len(paths), batch):
            images = [preprocess(Image.open(p).convert("RGB")) for p in paths[start : start + batch]]
            vectors.append(model.encode_image(torch.stack(images), normalize=True))
    np.savez(out, ids=np.asarray(paths), vectors=torch.cat(vectors).numpy())
    print(f"wrote {len(paths)} vectors to {out}")


if __name__ == "__main__":
    main()
