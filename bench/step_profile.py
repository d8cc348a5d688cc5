"""Inside the training step: where its time goes (torch.profiler, by operator family), and A/B trials of what the
libraries offer, each against the baseline step in the same process.

    python -m bench.step_profile                        # profile table + every trial (clip-tiny, batch 128, fp32)
    python -m bench.step_profile --trials foreach,threads1 --steps 40
    python -m bench.step_profile --captions /tmp/w26/product/train.csv --profile ours   # the product set's titles

The baseline is stock open_clip's step (torch's attention, the full context): forward of both towers, open_clip's
ClipLoss, backward, AdamW with the project's settings, zero_grad. `lean_attention`, `text_trim` and `ours` (both)
are this project's step (model/lean_attention.py, model/text_trim.py; `--captions` gives real caption lengths,
which decide how much text_trim cuts); the others are what the libraries offer. A trial builds its own copy
of the model from the same weights and runs step k on the same batch as the baseline, alternating A B, B A, ...;
per-step CPU time (time.process_time: both threads, what load from others changes least) and wall time are
compared by their medians, and the losses of the two runs must agree (`max |loss A - loss B|` is printed).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from statistics import median

import open_clip
import torch

from bench.common import TINY_MODEL, markdown_table

# operator families of the profile (aten names, forward and backward); the rest is "other"
FAMILIES = {
    "matrix products (mm, addmm, bmm, conv)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
                                               "aten::convolution", "aten::convolution_backward", "aten::linear",
                                               "aten::matmul", "aten::_convolution", "aten::mkldnn_convolution"),
    "attention (sdpa + backward)": ("scaled_dot_product", "_softmax", "softmax"),
    "layer norm (+ backward)": ("layer_norm",),
    "GELU (+ backward)": ("gelu",),
    "optimizer (AdamW)": ("adam",),
    "element-wise (add, mul, copy, ...)": ("aten::add", "aten::mul", "aten::copy_", "aten::div", "aten::sub",
                                           "aten::fill_", "aten::zero_", "aten::sum", "aten::clone", "aten::cat",
                                           "aten::contiguous", "aten::to", "aten::_to_copy", "aten::masked_fill",
                                           "aten::where", "aten::exp", "aten::neg", "aten::pow", "aten::sqrt"),
    "loss (log-softmax, nll)": ("log_softmax", "nll_loss", "cross_entropy"),
    "embedding (+ backward)": ("embedding",),
}


def build() -> tuple[torch.nn.Module, Callable]:
    """clip-tiny as stock open_clip builds it (torch's attention: load_model's lean attention taken out)."""
    from adapters.clip_finetune.config import FinetuneConfig
    from adapters.clip_finetune.model import lean_attention
    from adapters.clip_finetune.model.clip import load_model

    torch.manual_seed(0)
    clip = load_model(FinetuneConfig(model_name=str(TINY_MODEL), pretrained=None, device="cpu"))
    lean_attention.uninstall(clip.model)
    return clip.model, clip.tokenizer


def make_batch(tokenizer: Callable, n: int, side: int = 64, captions_csv: str | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and n captions: the first n of a CSV's second column (e.g. a preset's train.csv), else
    3-7 words of shop titles."""
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, side, side, generator=g)
    if captions_csv:
        import csv

        with open(captions_csv, newline="", encoding="utf-8") as f:
            captions = [row[1] for row in list(csv.reader(f))[1 : n + 1]]
    else:
        words = ["red", "blue", "mug", "lamp", "striped", "Tasse", "in", "Blau", "dotted", "chair", "classic", "shoe"]
        captions = [" ".join(words[(i * 7 + k * 3) % len(words)] for k in range(3 + i % 5)) for i in range(n)]
    return images, tokenizer(captions)


def optimizer_for(model: torch.nn.Module, kind: str = "fused") -> torch.optim.Optimizer:
    """AdamW as training.optim makes it (betas, eps, wd on >= 2-d weights), fused / foreach / for-loop."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    extra = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}[kind]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                             lr=1e-3, betas=(0.9, 0.98), eps=1e-6, **extra)


class Stepper:
    """One model + optimizer; `step(images, tokens)` runs one training step and returns (loss, cpu s, wall s)."""

    def __init__(self, model: torch.nn.Module, opt: str = "fused", forward: Callable | None = None,
                 prepare: Callable | None = None) -> None:
        self.model, self.optimizer, self.loss = model, optimizer_for(model, opt), open_clip.ClipLoss()
        self.forward = forward or model
        self.prepare = prepare or (lambda images: images)

    def step(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[float, float, float]:
        c0, t0 = time.process_time(), time.perf_counter()
        out = self.forward(self.prepare(images), tokens)
        loss = self.loss(*out[:3])
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, 4.6052)  # as in CLIP (and this project's step)
        return float(loss), time.process_time() - c0, time.perf_counter() - t0


def profile(stepper: Stepper, batch: tuple[torch.Tensor, torch.Tensor], steps: int) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for _ in range(3):
        stepper.step(*batch)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            stepper.step(*batch)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    families: dict[str, float] = defaultdict(float)
    for e in events:
        families[_family(e.key)] += e.self_cpu_time_total
    rows = [[f, f"{us / steps / 1e3:.1f}", f"{us / total:.1%}"] for f, us in sorted(families.items(),
                                                                                     key=lambda kv: -kv[1])]
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:22]
    ops = [[e.key, f"{e.self_cpu_time_total / steps / 1e3:.2f}", f"{e.self_cpu_time_total / total:.1%}",
            f"{e.count // steps}"] for e in top]
    return ("Self CPU time per step by operator family (torch.profiler, all threads' operator time):\n\n"
            + markdown_table(["family", "ms per step", "share"], rows) + "\n\nTop operators:\n\n"
            + markdown_table(["operator", "self ms per step", "share", "calls per step"], ops))


def _family(key: str) -> str:
    for family, names in FAMILIES.items():
        if any(n in key for n in names):
            return family
    return "other"


def trial(name: str, a: Stepper, b: Stepper, batch: tuple[torch.Tensor, torch.Tensor], steps: int) -> list[str]:
    """Alternating steps of baseline `a` and variant `b` on the same batch: medians, ratio, loss difference."""
    for s in (a, b):  # warm-up (kernels chosen, allocator filled; a compiled model compiles here)
        s.step(*batch)
    times: dict[int, list[tuple[float, float]]] = {0: [], 1: []}
    diff = 0.0
    for k in range(steps):
        order = (0, 1) if k % 2 == 0 else (1, 0)
        losses = {}
        for i in order:
            loss, cpu, wall = (a, b)[i].step(*batch)
            losses[i] = loss
            times[i].append((cpu, wall))
        diff = max(diff, abs(losses[0] - losses[1]))
    cpu_a, cpu_b = (median(c for c, _ in times[i]) for i in (0, 1))
    wall_a, wall_b = (median(w for _, w in times[i]) for i in (0, 1))
    return [name, f"{cpu_a * 1e3:.0f}", f"{cpu_b * 1e3:.0f}", f"{cpu_a / cpu_b:.3f}x", f"{wall_a * 1e3:.0f}",
            f"{wall_b * 1e3:.0f}", f"{wall_a / wall_b:.3f}x", f"{diff:.2e}"]


def variants(base: torch.nn.Module) -> dict[str, Callable[[], Stepper]]:
    def fresh() -> torch.nn.Module:
        return copy.deepcopy(base)

    def channels_last() -> Stepper:
        m = fresh().to(memory_format=torch.channels_last)
        return Stepper(m, prepare=lambda x: x.contiguous(memory_format=torch.channels_last))

    def compiled() -> Stepper:
        m = fresh()
        return Stepper(m, forward=torch.compile(m))

    def sdpa(backend_name: str) -> Callable[[], Stepper]:
        def make() -> Stepper:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            m = fresh()

            def forward(images: torch.Tensor, tokens: torch.Tensor) -> tuple:
                with sdpa_kernel(getattr(SDPBackend, backend_name)):  # forward and (recorded) backward
                    return m(images, tokens)

            return Stepper(m, forward=forward)

        return make

    def ours(lean: bool, trim: bool) -> Callable[[], Stepper]:
        """This project's step: lean attention (model/lean_attention.py) and/or cut text (model/text_trim.py)."""
        def make() -> Stepper:
            from adapters.clip_finetune.model import lean_attention, text_trim

            m = fresh()
            if lean:
                lean_attention.install(m)
            if not trim:
                return Stepper(m)
            return Stepper(m, forward=lambda images, tokens: text_trim.forward(
                m, images, text_trim.trim_tokens(m, tokens)))

        return make

    return {"foreach": lambda: Stepper(fresh(), "foreach"), "loop": lambda: Stepper(fresh(), "loop"),
            "channels_last": channels_last, "compile": compiled, "sdpa_math": sdpa("MATH"),
            "lean_attention": ours(True, False), "text_trim": ours(False, True), "ours": ours(True, True)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30, help="alternating steps per trial (each system)")
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--captions", help="a CSV whose second column gives the batch's captions "
                        "(e.g. the product preset's train.csv); default: generated 3-7 word titles")
    parser.add_argument("--profile", default="baseline", choices=["baseline", "ours"],
                        help="the step the profile table breaks down: stock open_clip's or this project's")
    parser.add_argument("--trials", default="lean_attention,text_trim,ours,foreach,channels_last,threads1",
                        help="comma-separated of lean_attention, text_trim, ours, foreach, loop, channels_last, "
                             "sdpa_math, compile, threads1, interop1")
    args = parser.parse_args(argv)
    model, tokenizer = build()
    batch = make_batch(tokenizer, args.batch, captions_csv=args.captions)
    print(f"clip-tiny, batch {args.batch}, fp32, {torch.get_num_threads()} torch threads, "
          f"{torch.get_num_interop_threads()} interop threads, torch {torch.__version__}\n")
    rows, made = [], variants(model)
    profiled = made["ours"]() if args.profile == "ours" else Stepper(copy.deepcopy(model))
    print(f"Profile of the {args.profile} step.\n" + profile(profiled, batch, args.profile_steps) + "\n")
    for name in filter(None, (t.strip() for t in args.trials.split(","))):
        if name in made:
            rows.append(trial(name, Stepper(copy.deepcopy(model)), made[name](), batch, args.steps))
        elif name == "threads1":  # the same step on 1 thread: what the second core gives
            rows.append(_threads_trial(model, batch, args.steps))
        elif name == "interop1":
            rows.append([name, "", "", "", "", "", "", "(set before any parallel work: see --help; not run)"])
    print(markdown_table(["trial (B) vs baseline (A: stock open_clip step, fused AdamW, eager, contiguous)",
                          "A CPU ms", "B CPU ms", "A/B CPU", "A wall ms", "B wall ms", "A/B wall",
                          "max |loss A - loss B|"], rows))
    return 0


def _threads_trial(model: torch.nn.Module, batch: tuple, steps: int) -> list[str]:
    n = torch.get_num_threads()
    a, b = Stepper(copy.deepcopy(model)), Stepper(copy.deepcopy(model))
    a.step(*batch)
    b.step(*batch)
    times: dict[int, list[tuple[float, float]]] = {0: [], 1: []}
    for k in range(steps):
        for i in (0, 1) if k % 2 == 0 else (1, 0):
            torch.set_num_threads(n if i == 0 else 1)
            times[i].append((a, b)[i].step(*batch)[1:])
    torch.set_num_threads(n)
    cpu_a, cpu_b = (median(c for c, _ in times[i]) for i in (0, 1))
    wall_a, wall_b = (median(w for _, w in times[i]) for i in (0, 1))
    return [f"threads1 ({n} -> 1 thread)", f"{cpu_a * 1e3:.0f}", f"{cpu_b * 1e3:.0f}", f"{cpu_a / cpu_b:.3f}x",
            f"{wall_a * 1e3:.0f}", f"{wall_b * 1e3:.0f}", f"{wall_a / wall_b:.3f}x", ""]


if __name__ == "__main__":
    sys.exit(main())
