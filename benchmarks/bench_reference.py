"""Benchmark: v1.0 embedding, ours against the reference inference code, at equal threads.

Runs the public reference code (github ucam-eo/tessera, ``tessera_infer_QAT``: the v1.0 model
with the hand-written GRU pooling, 4 layers, 4 heads, and its batch sampling functions) beside
ours on the same d-pixels, with the same random v1.0 weights loaded into both (strict
``load_state_dict`` of our inference state dict), in one process, at each thread count
(``torch.set_num_threads``), the paths interleaved and the best of ``--reps`` taken. With
one thread the pixels/s are also given by process CPU time (``cpu`` rows): on a shared
machine the wall clock also counts the waits for a core.

What is compared, per pixel (both sides from in-memory arrays; file reading, DataLoader
workers and the output int8 quantisation are left out on both sides):

- reference: ``sample_s2_batch`` / ``sample_s1_batch`` (a Python loop over the pixels of a
  batch: ``np.random.choice`` of 40 steps per stream, standardise, stack), ``torch.tensor``,
  then ``MultimodalBTInferenceModel`` under ``torch.no_grad`` in float32, in batches of
  ``--ref-batch`` pixels (256: the reference's CPU configuration); ``repeat_times`` = 1.
- ours: :func:`tessera_model.embed_pixels` (seeded per-pixel sampling of 40 steps per stream,
  vectorised; normalisation; the model under ``torch.inference_mode``), automatic batch size,
  ``precision="fp32"`` and ``"int8-dynamic"``.

Both draw 40 of the valid steps per stream (with replacement when fewer), so the model work is
identical: 2 x 40 tokens per pixel. The random draws differ (the reference's global NumPy
RNG, our per-pixel hash), so the embeddings are compared on identical model inputs instead
(``max |diff|`` line). The reference code is read from a checkout given with ``--reference``
(e.g. ``git clone /work/.mirror/ucam-eo+tessera/repo /tmp/tessera-ref`` then
``git -C /tmp/tessera-ref checkout HEAD -- tessera_infer_QAT``); nothing of it is copied here.
Without a checkout the script says so and exits 0.

Usage::

    python benchmarks/bench_reference.py --reference /tmp/tessera-ref [--threads 1 2]
        [--pixels 256] [--reps 2]

Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tessera_model import ModelSpec, TesseraModel, embed_pixels, inference_state_dict  # noqa: E402
from tessera_model.constants import S1_MEAN, S1_STD, S2_MEAN, S2_STD  # noqa: E402

REF_SRC = "tessera_infer_QAT/src"
T2, TA, TD = 80, 45, 45


def load_reference(root: Path) -> dict | None:
    """Import the reference model builder, model class and samplers from a checkout."""
    src = root / REF_SRC
    if not (src / "models" / "modules.py").exists():
        return None
    sys.path.insert(0, str(src))
    try:
        from models.builder import build_inference_model  # type: ignore[import-not-found]
        from models.ssl_model import MultimodalBTInferenceModel  # type: ignore[import-not-found]
        from utils.data_processing import (  # type: ignore[import-not-found]
            sample_s1_batch,
            sample_s2_batch,
        )
    finally:
        sys.path.remove(str(src))
    return {"build": build_inference_model, "model": MultimodalBTInferenceModel,
            "s2": sample_s2_batch, "s1": sample_s1_batch}  # fmt: skip


def make_pixels(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """d-pixels: 80 S2 dates (25-60 clear), 45 ascending + 45 descending S1 dates."""
    rng = np.random.default_rng(seed)
    n2 = rng.integers(25, 61, n)
    s2_valid = np.argsort(rng.random((n, T2)), axis=1) < n2[:, None]
    asc = rng.integers(1, 12000, (n, TA, 2)).astype(np.int16)
    desc = rng.integers(1, 12000, (n, TD, 2)).astype(np.int16)
    asc[rng.random((n, TA)) < 0.3] = 0
    desc[rng.random((n, TD)) < 0.3] = 0
    return {
        "s2": rng.integers(0, 6000, (n, T2, 10)).astype(np.uint16), "s2_valid": s2_valid,
        "s2_doy": np.linspace(1, 365, T2).astype(np.uint16), "asc": asc, "desc": desc,
        "asc_doy": np.linspace(2, 364, TA).astype(np.uint16),
        "desc_doy": np.linspace(3, 365, TD).astype(np.uint16),
    }  # fmt: skip


def run_reference(ref: dict, model: torch.nn.Module, px: dict, batch: int) -> None:
    n = px["s2"].shape[0]
    s2_mean, s2_std = np.asarray(S2_MEAN, np.float32), np.asarray(S2_STD, np.float32)
    s1_mean, s1_std = np.asarray(S1_MEAN, np.float32), np.asarray(S1_STD, np.float32)
    with torch.no_grad():
        for start in range(0, n, batch):
            sl = slice(start, min(n, start + batch))
            b = sl.stop - sl.start
            x2 = ref["s2"](px["s2"][sl], px["s2_valid"][sl], np.broadcast_to(px["s2_doy"],
                           (b, T2)), s2_mean, s2_std, 40)  # fmt: skip
            x1 = ref["s1"](px["asc"][sl], np.broadcast_to(px["asc_doy"], (b, TA)),
                           px["desc"][sl], np.broadcast_to(px["desc_doy"], (b, TD)),
                           s1_mean, s1_std, 40)  # fmt: skip
            model(torch.tensor(x2, dtype=torch.float32), torch.tensor(x1, dtype=torch.float32))


def run_ours(model: TesseraModel, px: dict, precision: str) -> None:
    s1 = np.concatenate([px["asc"], px["desc"]], axis=1)
    s1_doy = np.concatenate([px["asc_doy"], px["desc_doy"]])
    keys = np.concatenate([px["asc_doy"].astype(np.int64), 1000 + px["desc_doy"].astype(np.int64)])
    n = s1.shape[0]
    embed_pixels(model, px["s2"], px["s2_valid"], px["s2_doy"], s1, (s1 != 0).any(-1), s1_doy,
                 keys, np.arange(n, dtype=np.uint64), seed=0, device="cpu",
                 all_steps_fallback=True, precision=precision)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", default=os.environ.get("TESSERA_REFERENCE_CHECKOUT", ""),
                    help="checkout of github ucam-eo/tessera (a work tree)")  # fmt: skip
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--pixels", type=int, default=256)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--ref-batch", type=int, default=256)
    args = ap.parse_args()
    ref = load_reference(Path(args.reference)) if args.reference else None
    if ref is None:
        print(f"no reference checkout with {REF_SRC}/models at {args.reference!r}: skipped "
              "(pass --reference /path/to/tessera checkout)")  # fmt: skip
        return
    spec = ModelSpec.preset("v1")
    torch.manual_seed(0)
    ours = TesseraModel(spec, with_projector=False).eval()
    s2b, s1b, head = ref["build"]({"latent_dim": 128, "fusion_method": "concat"}, "cpu")
    theirs = ref["model"](s2b, s1b, "concat", head).eval()
    theirs.load_state_dict(inference_state_dict(ours), strict=True)
    # same math: identical inputs through both models
    g = torch.Generator().manual_seed(1)
    x2, x1 = torch.randn(64, 40, 11, generator=g), torch.randn(64, 40, 3, generator=g)
    x2[..., 10] = torch.randint(1, 366, (64, 40), generator=g).float()
    x1[..., 2] = torch.randint(1, 366, (64, 40), generator=g).float()
    with torch.inference_mode():
        diff = float((ours.encode(x2, x1) - theirs(x2, x1)).abs().max())
        diff8 = ours.encode(x2, x1, "int8-dynamic")
        cos = torch.nn.functional.cosine_similarity(diff8, theirs(x2, x1), dim=1).min()
    px = make_pixels(args.pixels)
    load = os.getloadavg()
    print(
        f"CPU {platform.processor() or platform.machine()}, torch {torch.__version__}; "
        f"{args.pixels} pixels x 2 streams x 40 steps; load average {load[0]:.1f} at start"
    )
    print(f"same weights, identical inputs: max |ours fp32 - reference| = {diff:.2e}; "
          f"min cosine(ours int8, reference) = {float(cos):.5f}\n")  # fmt: skip
    print("| threads | clock | reference px/s | ours fp32 px/s | ours int8 px/s | fp32 / ref | "
          "int8 / ref |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    paths = {
        "ref": lambda: run_reference(ref, theirs, px, args.ref_batch),
        "fp32": lambda: run_ours(ours, px, "fp32"),
        "int8": lambda: run_ours(ours, px, "int8-dynamic"),
    }
    head = {k: v[:64] if v.ndim > 1 else v for k, v in px.items()}
    for threads in args.threads:
        torch.set_num_threads(threads)
        run_reference(ref, theirs, head, args.ref_batch)  # warm-up: allocator, int8 weights
        run_ours(ours, head, "fp32")
        run_ours(ours, head, "int8-dynamic")
        wall = {k: float("inf") for k in paths}
        cpu = dict(wall)
        for _ in range(args.reps):
            for name, fn in paths.items():
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                wall[name] = min(wall[name], time.perf_counter() - t0)
                cpu[name] = min(cpu[name], time.process_time() - c0)
        for clock, best in [("wall", wall)] + ([("cpu", cpu)] if threads == 1 else []):
            pps = {k: args.pixels / v for k, v in best.items()}
            print(f"| {threads} | {clock} | {pps['ref']:,.1f} | {pps['fp32']:,.1f} | "
                  f"{pps['int8']:,.1f} | {pps['fp32'] / pps['ref']:.2f}x | "
                  f"{pps['int8'] / pps['ref']:.2f}x |", flush=True)  # fmt: skip
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
