"""Embedding keeps nothing of a batch alive: the result is one array that owns its memory, not a collection of
per-batch torch buffers. Keeping those (numpy views of small torch tensors) fragmented glibc's heap and made
peak RSS grow with the item count (docs/performance.md, "Embedding"); the RSS itself is measured by
`python -m bench.embed --models ""`, not here (too slow for the suite)."""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from adapters.clip_finetune.config import FinetuneConfig
from adapters.clip_finetune.data.datasets import ImageDataset
from adapters.clip_finetune.data.decode_cache import transform_size
from adapters.clip_finetune.data.synthetic import render, sample_specs
from adapters.clip_finetune.model.clip import load_model
from adapters.clip_finetune.retrieval import embed
from adapters.clip_finetune.retrieval.embed import encode_image_tensors, encode_images, encode_texts


@pytest.fixture(scope="module")
def clip(tiny_model_config):
    torch.manual_seed(0)
    return load_model(FinetuneConfig(model_name=str(tiny_model_config), pretrained=None, device="cpu"))


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    folder = tmp_path_factory.mktemp("jpegs")
    paths = []
    for i, sample in enumerate(sample_specs(7, seed=3)):
        path = folder / f"{i}.jpg"
        render(sample, 80).save(path, "JPEG", quality=90)
        paths.append(str(path))
    return paths


def _owns_its_memory(a: np.ndarray) -> bool:
    return a.flags.owndata and a.base is None and a.flags.c_contiguous


def test_image_vectors_are_one_owned_array_equal_to_the_per_batch_results(clip, jpegs):
    vectors, kept = encode_images(clip, jpegs, batch_size=3, num_workers=0, progress=False)  # 3 batches, last partial
    assert kept == list(range(len(jpegs)))
    assert vectors.shape == (len(jpegs), clip.embed_dim) and vectors.dtype == np.float32
    assert _owns_its_memory(vectors)
    ds = ImageDataset(jpegs, clip.preprocess, transform_size(clip.preprocess))
    per_batch = [encode_image_tensors(clip, torch.stack([ds[i][0] for i in range(s, min(s + 3, len(ds)))]))
                 for s in range(0, len(ds), 3)]
    assert isinstance(per_batch[0].base, torch.Tensor)  # what used to be kept: a view of a torch buffer
    np.testing.assert_allclose(vectors, np.concatenate(per_batch), rtol=0, atol=1e-6)


def test_no_batch_result_outlives_the_next_batch(clip, jpegs, monkeypatch):
    """The regression itself: every batch's torch output kept alive until the end (as a numpy view in a list)."""
    outputs: list[weakref.ref] = []

    def spy(clip_, images):
        # batch k is being encoded: the loop may still hold batch k-1's result, nothing older
        assert [ref() is None for ref in outputs[:-1]] == [True] * len(outputs[:-1])
        features = encode_image_tensors(clip_, images)
        outputs.append(weakref.ref(features.base))  # the torch tensor behind the numpy view
        return features

    monkeypatch.setattr(embed, "encode_image_tensors", spy)
    vectors, _ = encode_images(clip, jpegs, batch_size=2, num_workers=0, progress=False)
    assert len(outputs) == 4 and all(ref() is None for ref in outputs)
    assert _owns_its_memory(vectors)


def test_skipped_images_leave_no_unused_rows(clip, jpegs, tmp_path: Path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    paths = [jpegs[0], str(broken), *jpegs[1:3]]
    vectors, kept = encode_images(clip, paths, batch_size=2, num_workers=0, progress=False)
    assert kept == [0, 2, 3]
    assert vectors.shape == (3, clip.embed_dim) and _owns_its_memory(vectors)
    alone, _ = encode_images(clip, [jpegs[0], *jpegs[1:3]], batch_size=2, num_workers=0, progress=False)
    np.testing.assert_allclose(vectors, alone, rtol=0, atol=1e-6)


def test_no_decodable_image_gives_an_empty_array(clip, tmp_path: Path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"")
    vectors, kept = encode_images(clip, [str(broken)], batch_size=2, num_workers=0, progress=False)
    assert kept == [] and vectors.shape == (0, clip.embed_dim) and vectors.dtype == np.float32


def test_text_vectors_are_one_owned_array(clip):
    texts = [f"a photo of {i} red squares" for i in range(5)]
    vectors = encode_texts(clip, texts, batch_size=2)
    assert vectors.shape == (5, clip.embed_dim) and _owns_its_memory(vectors)
    np.testing.assert_allclose(vectors[2:4], encode_texts(clip, texts[2:4], batch_size=2), rtol=0, atol=1e-6)
    assert encode_texts(clip, [], batch_size=2).shape == (0, clip.embed_dim)
