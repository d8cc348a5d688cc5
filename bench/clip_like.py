"""CLIP-like vectors for the search benchmark: image vectors in clusters on a cone, text queries across a modality
gap, a decaying spectrum, all unit norm. Uniform noise would flatter no index and mislead about all of them: real
CLIP vectors share a common direction (the cone), spread over few directions (a decaying spectrum), and text
queries sit off the image cloud (the modality gap), which is where compressed distances lose recall.

Model (d dimensions, a random rotation R so no axis is special; spectrum sigma_j^2 ~ j^-SPECTRUM, sum 1):
  image  x = normalise(m * u_img + R(c_k * sqrt(CLUSTER) + e * sqrt(1 - CLUSTER)))     c_k, e ~ N(0, diag sigma^2)
  text   t = normalise(m * u_txt + R(c_k * sqrt(CLUSTER) + e' * sqrt(1 - CLUSTER)))    a query about cluster k
with m = 1 (the cone: half of a vector's energy on the common direction), u_img . u_txt = GAP_COSINE.

The targets these parameters give (python -m bench.clip_like prints what was generated):
* mean image-image cosine ~0.5: CLIP's embeddings fill a narrow cone (Liang et al. 2022, "Mind the Gap",
  NeurIPS; the cone effect), m^2 = the rest's variance puts half of the energy on the common direction;
* the distance between the image and text centroids ~0.82, as Liang et al. measure for CLIP ViT-B/32 on MSCOCO:
  centroids of norm ~0.71 each at cosine 0.33 are 0.82 apart;
* a text's cosine with images of its own cluster ~0.3 and ~0.17 with others: CLIP's matched image-text cosines
  are about 0.3 (why CLIPScore, Hessel et al. 2021, rescales them by 2.5), far below image-image ones;
* the spectrum sigma_j^2 ~ 1/j (an assumption, not a measurement of a pretrained CLIP, which cannot be downloaded
  here): the top 10 of 512 directions carry ~40% of the variance, an effective dimension (participation
  ratio) of ~33: far from isotropic, as CLIP's embeddings are (Levi & Gilboa 2025, "The Double-Ellipsoid
  Geometry of CLIP": ellipsoid shells off the origin). The tiny model's own vectors are printed too (random
  init, embed_dim 64): a sharper cone (image-image cosine 0.9) and a gap of 1.18, as Liang et al. find at init.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator

import numpy as np

SPECTRUM = 1.0  # variance of the j-th direction ~ j^-SPECTRUM
CONE = 1.0  # m: the common direction's weight against the (unit-variance) rest
CLUSTER = 0.27  # share of the rest's variance that a cluster (a concept) explains
GAP_COSINE = 0.33  # u_img . u_txt
ITEMS_PER_CLUSTER = 100
CHUNK = 65_536


class ClipLike:
    """The generator's fixed parts for one (dim, n, seed): rotation, spectrum, cluster centres, the two cones."""

    def __init__(self, dim: int, n: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.dim, self.n, self.seed = dim, n, seed
        sigma = np.arange(1, dim + 1, dtype=np.float64) ** (-SPECTRUM / 2)
        self.sigma = (sigma / np.linalg.norm(sigma)).astype(np.float32)  # sum of variances 1
        self.rotation = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)
        self.clusters = max(10, n // ITEMS_PER_CLUSTER)
        self.centres = rng.standard_normal((self.clusters, dim)).astype(np.float32) * self.sigma
        u_img, w = np.linalg.qr(rng.standard_normal((dim, 2)))[0].T  # two orthonormal directions
        self.u_img = u_img.astype(np.float32)
        self.u_txt = (GAP_COSINE * u_img + np.sqrt(1 - GAP_COSINE**2) * w).astype(np.float32)

    def _vectors(self, cone: np.ndarray, cluster_of: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        noise = rng.standard_normal((len(cluster_of), self.dim), dtype=np.float32) * self.sigma
        rest = self.centres[cluster_of] * np.sqrt(CLUSTER) + noise * np.sqrt(1 - CLUSTER)
        x = CONE * cone + rest @ self.rotation.T
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    def images(self) -> Iterator[np.ndarray]:
        """The n image vectors, in chunks (a million 512-d float32 vectors are 2 GB)."""
        rng = np.random.default_rng([self.seed, 1])
        for start in range(0, self.n, CHUNK):
            size = min(CHUNK, self.n - start)
            yield self._vectors(self.u_img, rng.integers(0, self.clusters, size), rng)

    def texts(self, q: int) -> np.ndarray:
        """q text queries, each about a random cluster."""
        rng = np.random.default_rng([self.seed, 2])
        return self._vectors(self.u_txt, rng.integers(0, self.clusters, q), rng)


def statistics(images: np.ndarray, texts: np.ndarray, labels: np.ndarray | None = None) -> dict[str, float]:
    """What a sample of vectors looks like: mean cosines within and across modalities, the centroid gap, and the
    effective dimension (participation ratio of the images' covariance eigenvalues: (sum l)^2 / sum l^2)."""
    off = ~np.eye(len(images), dtype=bool)
    image_image = float((images @ images.T)[off].mean())
    eig = np.clip(np.linalg.eigvalsh(np.cov(images.T.astype(np.float64))), 0, None)
    stats = {"image_image_cosine": image_image, "text_image_cosine": float((texts @ images.T).mean()),
             "centroid_gap": float(np.linalg.norm(images.mean(0) - texts.mean(0))),
             "effective_dim": float(eig.sum() ** 2 / (eig**2).sum()),
             "top10_variance_share": float(np.sort(eig)[::-1][:10].sum() / eig.sum())}
    return {k: round(v, 3) for k, v in stats.items()}


def generated_statistics(dim: int, n: int = 20_000, sample: int = 2_000, seed: int = 0) -> dict[str, float]:
    gen = ClipLike(dim, n, seed)
    rng = np.random.default_rng([seed, 3])
    cluster = rng.integers(0, gen.clusters, sample)
    images, texts = gen._vectors(gen.u_img, cluster, rng), gen._vectors(gen.u_txt, cluster, rng)
    stats = statistics(images, texts)
    stats["matched_text_image_cosine"] = round(float(np.einsum("ij,ij->i", images, texts).mean()), 3)
    return stats


def tiny_model_statistics(count: int = 512) -> dict[str, float]:
    """The same statistics of the tiny open_clip model's (random init) image and caption vectors."""
    import torch

    from adapters.clip_finetune.config import build_config
    from adapters.clip_finetune.data.synthetic import render, sample_specs
    from adapters.clip_finetune.model.clip import load_model
    from adapters.clip_finetune.retrieval.embed import encode_texts

    from .common import TINY_MODEL

    clip = load_model(build_config({"model_name": str(TINY_MODEL), "pretrained": None}))
    samples = sample_specs(count, 0)
    pixels = torch.stack([clip.preprocess(render(s, 64)) for s in samples])
    with torch.no_grad():
        images = clip.model.encode_image(pixels, normalize=True).numpy()
    texts = encode_texts(clip, [s.caption for s in samples])
    stats = statistics(images, texts)
    stats["matched_text_image_cosine"] = round(float(np.einsum("ij,ij->i", images, texts).mean()), 3)
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="statistics of the CLIP-like vectors and of the tiny model's")
    parser.add_argument("--dim", type=int, default=512, help="dimensions (default: 512)")
    parser.add_argument("--tiny", action="store_true", help="also the tiny open_clip model's vectors")
    args = parser.parse_args(argv)
    print(json.dumps({"source": f"clip_like dim {args.dim}", **generated_statistics(args.dim)}))
    if args.tiny:
        print(json.dumps({"source": "tiny open_clip model, random init, dim 64", **tiny_model_statistics()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
