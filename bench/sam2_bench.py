"""SAM2 backend overhead benchmark (random weights, CPU).

1. Frames/s of ``SAM2Propagator.propagate`` versus BARE sam2 (``init_state`` + ``add_new_mask`` +
   ``propagate_in_video`` on the very same JPEG frames), measured side by side in one process, alternating,
   after one warm-up each. The propagator's time includes everything it does (normalisation, interleaving,
   JPEG writing, IoU capture, mask collection, confidence table); the bare run's frames are written beforehand
   and not timed, so the ratio is a conservative measure of our overhead. Target: ratio >= 0.9.
2. Model builds for N targets with one propagator (target: 1).

Usage: ``.venv/bin/python bench/sam2_bench.py [--quick]``
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

import nnsam2_assets.propagation.sam2 as sam2_backend  # also installs the Hydra shim before sam2 imports
from bench._common import cpu_model
from nnsam2_assets.propagation.frames import build_frame_sequence, normalise_for_frames, write_frame_stack
from nnsam2_assets.propagation.sam2 import SAM2Propagator, build_sam2_video_predictor, target_seed_slice
from nnsam2_assets.testing.cohorts import two_blob_annotation, two_blob_volume

THREADS = 2
RATIO_TARGET = 0.9


def _bare_predictor(image_size: int, device: str = "cpu", config: str = sam2_backend.DEFAULT_CONFIG):
    """Stock SAM2VideoPredictor with the same size overrides and post-processing as the propagator."""
    feat = image_size // 16
    pred = build_sam2_video_predictor(
        config,
        ckpt_path=None,
        device=device,
        hydra_overrides_extra=[
            f"++model.image_size={image_size}",
            f"++model.memory_attention.layer.self_attention.feat_sizes=[{feat},{feat}]",
            f"++model.memory_attention.layer.cross_attention.feat_sizes=[{feat},{feat}]",
        ],
    )
    pred.fill_hole_area = 0
    return pred


def _run_bare(pred, folders: list[Path], seed_mask: np.ndarray, class_ids: list[int]) -> int:
    frames = 0
    with torch.inference_mode():
        for folder in folders:
            state = pred.init_state(str(folder))
            for cid in class_ids:
                pred.add_new_mask(state, 0, cid, torch.from_numpy(seed_mask == cid))
            for _, _, masks in pred.propagate_in_video(state):
                (masks > 0).cpu()  # a consumer has to look at the masks too
                frames += 1
            pred.reset_state(state)
    return frames


SETTINGS = {  # image_size, slice height/width, reference and target slices, repetitions
    "smoke": (128, 64, 4, 4, 1),  # bench.run --quick: the plumbing, in seconds
    "small": (256, 64, 6, 6, 2),
    "full": (512, 256, 10, 10, 3),
    # bench/gpu_check.py: SAM2's own input size on slices and slice counts of a TUM scan
    "gpu": (1024, 400, 29, 29, 2),
}


def run_sam2_bench(
    quick: bool,
    reps: int | None = None,
    smoke: bool = False,
    *,
    setting: str | None = None,
    device: str = "cpu",
    config: str = sam2_backend.DEFAULT_CONFIG,
    bf16: bool = False,
) -> list[dict]:
    """Rows of frames/s, propagator against bare sam2. ``bf16`` adds a bare run under CUDA bf16 autocast (the
    precision of SAM2's published speeds; the propagator stays fp32 like the reference)."""
    if bf16 and not device.startswith("cuda"):
        raise ValueError(f"bf16 rows need a CUDA device, got {device!r}")
    setting = setting or ("smoke" if smoke else "small" if quick else "full")
    image_size, hw, n_ref, n_tgt, default_reps = SETTINGS[setting]
    reps = reps or default_reps
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    rows: list[dict] = []
    try:
        ref = two_blob_volume(n_ref, (hw, hw), seed=0)
        tgt = two_blob_volume(n_tgt, (hw, hw), seed=1, shift=2)
        seed = n_ref // 2
        ann = two_blob_annotation(ref, seed)
        class_ids = [1, 2]
        ref_img, ann_img, tgt_img = (sitk.GetImageFromArray(a) for a in (ref, ann, tgt))

        torch.manual_seed(0)
        prop = SAM2Propagator(
            image_size=image_size, allow_random_weights=True, device=device, threads=THREADS, config=config
        )
        torch.manual_seed(0)  # same random weights -> same presence decisions -> same work
        bare = _bare_predictor(image_size, device, config)

        with tempfile.TemporaryDirectory(prefix="sam2bench-") as tmp:
            seqs = build_frame_sequence(
                normalise_for_frames(ref, "mri"),
                normalise_for_frames(tgt, "mri"),
                seed,
                target_seed=target_seed_slice(seed, n_ref, n_tgt),
            )
            folders = []
            for direction, seq in seqs.items():
                write_frame_stack(seq, Path(tmp) / direction)
                folders.append(Path(tmp) / direction)
            n_frames = sum(len(s) for s in seqs.values())

            times: dict[str, list[float]] = {"propagator": [], "bare": []}

            def run_prop() -> None:
                prop.propagate(ref_img, ann_img, seed, tgt_img, "mri")

            def run_bare() -> None:
                bare_frames = _run_bare(bare, folders, ann[seed], class_ids)
                assert bare_frames == n_frames, (bare_frames, n_frames)

            def run_bare_bf16() -> None:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    run_bare()

            order = [("propagator", run_prop), ("bare", run_bare)]
            if bf16:
                times["bare_bf16"] = []
                order.append(("bare_bf16", run_bare_bf16))
            for rep in range(reps + 1):  # rep 0 = warm-up, not recorded; order alternates between reps
                for impl, fn in order if rep % 2 == 0 else order[::-1]:
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    fn()
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    if rep:
                        times[impl].append(time.perf_counter() - t0)

        fps = {}
        for impl, ts in times.items():
            med = statistics.median(ts)
            fps[impl] = n_frames / med
            rows.append(
                {
                    "bench": "sam2_fps",
                    "impl": impl,
                    "device": device,
                    "config": Path(config).stem,
                    "image_size": image_size,
                    "slice_hw": hw,
                    "frames": n_frames,
                    "reps": reps,
                    "median_s": round(med, 3),
                    "min_s": round(min(ts), 3),
                    "fps": round(fps[impl], 3),
                    "s_per_frame": round(med / n_frames, 4),
                }
            )
        ratio = fps["propagator"] / fps["bare"]
        rows.append(
            {
                "bench": "sam2_fps_ratio",
                "ratio": round(ratio, 3),
                # best-of-reps ratio: less sensitive to other processes competing for the 2 cores
                "ratio_best": round(min(times["bare"]) / min(times["propagator"]), 3),
                "target": f">={RATIO_TARGET}",
                "ok": ratio >= RATIO_TARGET,
            }
        )

        # model builds for N targets with one propagator (tiny frames: only the count matters here)
        n_targets = 3 if quick else 5
        before = sam2_backend.MODEL_BUILDS
        small = SAM2Propagator(image_size=64, allow_random_weights=True, device=device, threads=THREADS)
        small_ref = two_blob_volume(4, seed=10)
        small_ann = sitk.GetImageFromArray(two_blob_annotation(small_ref, 1))
        for i in range(n_targets):
            target = sitk.GetImageFromArray(two_blob_volume(3 + i, seed=20 + i))
            small.propagate(sitk.GetImageFromArray(small_ref), small_ann, 1, target, "mri")
        builds = sam2_backend.MODEL_BUILDS - before
        rows.append(
            {
                "bench": "sam2_model_builds",
                "targets": n_targets,
                "builds": builds,
                "target": 1,
                "ok": builds == 1,
            }
        )
    finally:
        torch.set_num_threads(previous_threads)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="image_size 256, 64x64 slices, 2 reps")
    args = parser.parse_args()
    rows = run_sam2_bench(quick=args.quick)
    for row in rows:
        print("  ".join(f"{k}={v}" for k, v in row.items()))
    by = {(r["bench"], r.get("impl")): r for r in rows}
    prop, bare = by[("sam2_fps", "propagator")], by[("sam2_fps", "bare")]
    ratio = by[("sam2_fps_ratio", None)]
    print(
        f"\nSAM2 frames/s (CPU, {THREADS} threads, image_size={prop['image_size']}, {prop['frames']} frames): "
        f"propagator {prop['fps']:.3f} f/s ({prop['s_per_frame']:.3f} s/frame) vs bare sam2 {bare['fps']:.3f} f/s "
        f"({bare['s_per_frame']:.3f} s/frame) -> ratio {ratio['ratio']:.3f} (target >= {RATIO_TARGET}: "
        f"{'OK' if ratio['ok'] else 'MISSED'}; best-of-reps ratio {ratio['ratio_best']:.3f})"
    )
    builds = by[("sam2_model_builds", None)]
    print(
        f"model builds for {builds['targets']} targets: {builds['builds']} (target 1: {'OK' if builds['ok'] else 'MISSED'})"
    )
    print(f"CPU: {cpu_model()}")


if __name__ == "__main__":
    main()
