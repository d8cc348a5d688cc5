"""Each kept optimisation (data/decode_cache.py, docs/performance.md) gives what the straightforward path gives:
draft-decoded embeddings within cosine 0.999, cached and streamed training images pixel-identical,
threaded batches identical to serial ones, fused AdamW equal to the per-tensor loop."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adapters.clip_finetune.config import FinetuneConfig
from adapters.clip_finetune.data.datasets import ImageDataset, PairDataset
from adapters.clip_finetune.data.decode_cache import (
    TRAIN_SIDE_FACTOR,
    DecodedCache,
    InputCache,
    load_reduced,
    train_cache,
    transform_size,
)
from adapters.clip_finetune.data.images import load_image
from adapters.clip_finetune.data.pairs import CaptionPair
from adapters.clip_finetune.data.synthetic import render, sample_specs
from adapters.clip_finetune.machine import thread_map
from adapters.clip_finetune.model.clip import load_model
from adapters.clip_finetune.retrieval.embed import encode_images


def _photos(folder: Path, n: int, size: tuple[int, int] = (1600, 1200), fmt: str = "JPEG") -> list[str]:
    """Photo-like files: a synthetic scene upscaled onto a canvas, with sensor-like noise."""
    w, h = size
    paths = []
    for i, sample in enumerate(sample_specs(n, seed=7)):
        square = render(sample, 96).resize((h, h), Image.Resampling.BICUBIC)
        canvas = Image.new("RGB", size, square.getpixel((0, 0)))
        canvas.paste(square, ((w - h) // 2, 0))
        noisy = np.asarray(canvas, np.float32) + np.random.default_rng(i).normal(0, 2.5, (h, w, 3))
        path = folder / f"{i}.{'jpg' if fmt == 'JPEG' else 'png'}"
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, fmt, quality=90)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return _photos(tmp_path_factory.mktemp("photos"), 6)


def _model(tmp_path: Path, tiny_model_config: Path, image_size: int):
    cfg = json.loads(tiny_model_config.read_text())
    cfg["vision_cfg"].update(image_size=image_size, patch_size=image_size // 8)
    path = tmp_path / f"tiny-{image_size}.json"
    path.write_text(json.dumps(cfg))
    torch.manual_seed(0)
    return load_model(FinetuneConfig(model_name=str(path), pretrained=None, device="cpu"))


@pytest.mark.parametrize("image_size, scale", [(64, 8), (224, 4)])
def test_draft_decoding_keeps_embeddings_within_tolerance(photos, tmp_path, tiny_model_config, image_size, scale):
    clip = _model(tmp_path, tiny_model_config, image_size)
    assert load_image(photos[0], draft=image_size).size == (1600 // scale, 1200 // scale)  # never below the input
    fast, kept = encode_images(clip, photos, batch_size=4, num_workers=0, progress=False)
    full, _ = encode_images(clip, photos, batch_size=4, num_workers=0, progress=False, draft=False)
    assert kept == list(range(len(photos)))
    same = np.sum(fast * full, axis=1)  # unit vectors: cosine per image
    assert same.min() >= 0.999
    # the tolerance means something: different images are further apart than a draft is from its full decode
    assert (1 - same).max() < 0.2 * (1 - np.min(full @ full.T))


def test_draft_leaves_other_formats_alone(tmp_path):
    png = _photos(tmp_path, 1, (320, 240), "PNG")[0]
    assert np.array_equal(np.asarray(load_image(png, draft=32)), np.asarray(load_image(png)))


def test_cached_and_streamed_images_are_identical(photos):
    side = 80
    cache = DecodedCache(side, budget_mb=1)  # 1 MiB: room for a few 107x80 images
    first = [np.asarray(cache.get(i, p)) for i, p in enumerate(photos)]
    again = [np.asarray(cache.get(i, p)) for i, p in enumerate(photos)]
    streamed = [np.asarray(load_reduced(p, side)) for p in photos]
    assert len(cache) == len(photos) and cache.used <= cache.budget
    for a, b, c in zip(first, again, streamed, strict=True):
        assert a.shape == (side, 107, 3) and np.array_equal(a, b) and np.array_equal(a, c)


def test_cache_budget_is_honoured_and_the_rest_streams(photos):
    one = load_reduced(photos[0], 80)
    cache = DecodedCache(80, budget_mb=2.5 * np.asarray(one).nbytes / 2**20)  # room for 2 images
    for _ in range(2):
        out = [np.asarray(cache.get(i, p)) for i, p in enumerate(photos)]
    assert len(cache) == 2 and cache.full and cache.used <= cache.budget
    assert all(np.array_equal(a, np.asarray(load_reduced(p, 80))) for a, p in zip(out, photos, strict=True))
    assert len(DecodedCache(80, budget_mb=0)._arrays) == 0 and DecodedCache(80, 0).full


def test_train_cache_side_and_fallbacks(tiny_model_config):
    clip = load_model(FinetuneConfig(model_name=str(tiny_model_config), pretrained=None, device="cpu"))
    assert transform_size(clip.preprocess_train) == transform_size(clip.preprocess) == 64
    cache = train_cache(clip.preprocess_train, 100, num_workers=0)
    assert cache is not None and cache.side == int(np.ceil(64 * TRAIN_SIDE_FACTOR)) and not cache.full
    assert train_cache(clip.preprocess_train, 100, num_workers=2).full  # workers: same pixels, nothing kept
    assert train_cache(clip.preprocess_train, 0, num_workers=0).full


def test_training_samples_equal_with_and_without_cache(photos, tiny_model_config):
    clip = load_model(FinetuneConfig(model_name=str(tiny_model_config), pretrained=None, device="cpu"))
    pairs = [CaptionPair(p, f"caption {i}") for i, p in enumerate(photos)]
    keys = [(1, i) for i in range(len(pairs))]
    cached = PairDataset(pairs, clip.preprocess_train, clip.tokenizer, seed=3, cache=DecodedCache(80, 64))
    streamed = PairDataset(pairs, clip.preprocess_train, clip.tokenizer, seed=3, cache=DecodedCache(80, 0))
    for _ in range(2):  # the second pass reads the cache
        batch = [cached[k] for k in keys]
        serial = [streamed[k] for k in keys]
        for (a, ta, ia), (b, tb, ib) in zip(batch, serial, strict=True):
            assert torch.equal(a, b) and torch.equal(ta, tb) and ia == ib


def test_reduced_training_images_stay_close_to_full_resolution_crops(photos, tiny_model_config):
    """The cache stores images shrunk to 1.25x the input: the same seeded crop of the full image differs
    by a few grey levels (resampling), far less than two different images."""
    clip = load_model(FinetuneConfig(model_name=str(tiny_model_config), pretrained=None, device="cpu"))
    pairs = [CaptionPair(p, "c") for p in photos]
    reduced = PairDataset(pairs, clip.preprocess_train, clip.tokenizer, seed=3, cache=DecodedCache(80, 0))
    full = PairDataset(pairs, clip.preprocess_train, clip.tokenizer, seed=3)
    diffs = [(reduced[(1, i)][0] - full[(1, i)][0]).abs().mean().item() for i in range(len(pairs))]
    between = (full[(1, 0)][0] - full[(1, 1)][0]).abs().mean().item()
    assert max(diffs) < 0.1 and max(diffs) < 0.25 * between


def test_threaded_embedding_batches_equal_serial(photos, tiny_model_config):
    clip = load_model(FinetuneConfig(model_name=str(tiny_model_config), pretrained=None, device="cpu"))
    ds = ImageDataset([*photos, "missing.jpg"], clip.preprocess, draft=64)
    batch = ds.__getitems__(list(range(len(ds))))
    for got, want in zip(batch[:-1], [ds[i] for i in range(len(photos))], strict=True):
        assert torch.equal(got[0], want[0]) and got[1] == want[1]
    assert batch[-1].reason == "undecodable image"
    assert thread_map(lambda x: x * x, list(range(50)), threads=2) == [x * x for x in range(50)]
    inputs = InputCache(clip.preprocess, 64, 64)  # evaluation: kept pixels, the tensor steps once per batch
    cached = ImageDataset([*photos, "missing.jpg"], clip.preprocess, draft=64, inputs=inputs)
    for _ in range(2):  # made, then read from the cache
        batch = cached.__getitems__(list(range(len(cached))))
        for got, want in zip(batch[:-1], [ds[i] for i in range(len(photos))], strict=True):
            assert torch.equal(got[0], want[0]) and got[1] == want[1]
        assert batch[-1].reason == "undecodable image" and len(inputs) == len(photos)


def test_fused_adamw_on_cpu_matches_the_per_tensor_loop(tiny_model_config):
    """The same gradients give the same updates (to float rounding) with the fused kernel fit uses on CPU."""
    from adapters.clip_finetune.training.optim import param_groups

    clip = load_model(FinetuneConfig(model_name=str(tiny_model_config), pretrained=None, device="cpu"))
    torch.manual_seed(1)
    grads = [[torch.randn_like(p) for p in clip.model.parameters()] for _ in range(3)]
    results = []
    for fused in (False, True):
        model = copy.deepcopy(clip.model)
        opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.98), eps=1e-6, fused=fused)
        for step in grads:
            for p, g in zip(model.parameters(), step, strict=True):
                p.grad = g.clone()
            opt.step()
        results.append(list(model.parameters()))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)


def test_per_sample_seeding_matches_torch_manual_seed(photos, tiny_model_config):
    """Seeding only the CPU generator (cheap) augments exactly as torch.manual_seed did."""
    clip = load_model(FinetuneConfig(model_name=str(tiny_model_config), pretrained=None, device="cpu"))
    ds = PairDataset([CaptionPair(photos[0], "c")], clip.preprocess_train, clip.tokenizer, seed=5,
                     cache=DecodedCache(80, 0))
    image = load_reduced(photos[0], 80)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(hash((5, 2, 0)) & 0x7FFF_FFFF_FFFF_FFFF)
        want = clip.preprocess_train(image)
    assert torch.equal(ds[(2, 0)][0], want)


def _whole_transform(ds: PairDataset, transform, key: tuple[int, int]) -> torch.Tensor:
    """`transform` on the sample's image as the dataset seeds it (the per-sample path of the last round)."""
    image = ds._decode(key[1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(hash((ds.seed, *key)) & 0x7FFF_FFFF_FFFF_FFFF)
        return transform(image)


def test_a_batchs_tensor_steps_at_once_give_each_samples_own_pixels(photos, tiny_model_config):
    """ToTensor + Normalize run once per batch (batch_tail.py): bit-identical to the whole transform per
    sample; an undecodable image is still dropped and counted, an image the uint8 path declines (here a float
    "F" image made by the transform's own step) takes the per-sample path."""
    from torchvision import transforms as T

    from adapters.clip_finetune.data.batch_tail import split_tail

    clip = load_model(FinetuneConfig(model_name=str(tiny_model_config), pretrained=None, device="cpu"))
    pairs = [CaptionPair(p, f"caption {i}") for i, p in enumerate([*photos, "missing.jpg"])]
    ds = PairDataset(pairs, clip.preprocess_train, clip.tokenizer, seed=4, cache=DecodedCache(80, 64))
    keys = [(3, i) for i in range(len(pairs))]
    batch = ds.__getitems__(keys)
    assert batch[-1].reason == "undecodable image"
    for key, (image, tokens, i) in zip(keys[:-1], batch[:-1], strict=True):
        assert i == key[1] and torch.equal(tokens, ds.tokens[i])
        assert torch.equal(image, _whole_transform(ds, clip.preprocess_train, key))
    modes: list[str] = []

    def grey_or_float(image: Image.Image) -> Image.Image:
        out = image.convert("F" if len(modes) % 2 else "L")
        modes.append(out.mode)
        return out

    mixed = T.Compose([T.RandomResizedCrop(16), T.Lambda(grey_or_float), T.ToTensor(), T.Normalize([0.5], [0.25])])
    ds = PairDataset(pairs[:4], mixed, clip.tokenizer, seed=4, cache=DecodedCache(80, 64))
    got = ds.__getitems__(keys[:4])
    assert modes == ["L", "F", "L", "F"]  # batched, per sample, batched, per sample
    for key, sample in zip(keys[:4], got, strict=True):
        want = _whole_transform(ds, mixed, key)  # (modes keeps alternating: the same order again)
        assert want.shape == (1, 16, 16) and torch.equal(sample[0], want)
    assert split_tail(T.Compose([T.ToTensor(), T.Normalize([0.5], [0.5], inplace=True)]))[1] is None
    assert split_tail(T.Compose([T.CenterCrop(8), T.ToTensor()]))[1] is None
