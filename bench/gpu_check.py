"""Checks and timings that need a CUDA GPU, in one short run (CI has no GPU; run this where one is lent).

1. SAM2 propagation at SAM2's own input size (1024 px) on TUM-sized scans (400 x 400 slices, 29 reference and
   29 target slices), random weights: frames/s of the propagator against bare sam2 on the same frames, for
   the hiera-tiny (the default) and hiera-B+ configs, plus bare sam2 under bf16 autocast, the precision of
   SAM2's published speeds. Random weights cost the same arithmetic as real ones; the masks are meaningless.
2. nnU-Net: seconds per training iteration of the quick profile (2d) and the paper profile (3d_fullres) on a
   generated cohort of TUM-crop-sized scans, through ``train_model`` as the stages call it. torch.compile is
   off here unless ``--compile``, which compiles both profiles (in the pipeline the quick profile never
   compiles and the paper profile keeps nnU-Net's CUDA default, on): then the first epoch's time shows the
   compilation, the last epoch's the compiled rate.
   Each model then predicts one scan on the GPU (``Predictor``, everything on the device): seconds per scan,
   and the Dice of the prediction against that scan's labels (a few iterations learn the bright blobs, so a
   GPU path that returns garbage shows up as a low Dice).

Imports no Dagster and no DuckDB, so the GPU machine needs only the pipeline's domain packages.

Usage: ``python -m bench.gpu_check [--iterations N] [--json PATH]``. ``--device cpu --skip sam2 --profiles quick
--shape Z Y X`` runs the nnU-Net part small on a CPU (the test suite's check that this script still runs).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from nnsam2_assets.testing.cohorts import two_blob_annotation, two_blob_volume
from nnsam2_assets.testing.machine import machine

# TUM water images in the stages' muscle box are about this size (slices, rows, columns) and spacing (z, y, x)
CROP_SHAPE = (29, 144, 224)
CROP_SPACING_MM = (3.3, 0.94, 0.94)
SAM2_CONFIGS = ("configs/sam2.1/sam2.1_hiera_t.yaml", "configs/sam2.1/sam2.1_hiera_b+.yaml")


def _print(text: str) -> None:
    print(text, flush=True)


def sam2_rows() -> list[dict]:
    from bench.sam2_bench import run_sam2_bench

    rows = []
    for config in SAM2_CONFIGS:
        t0 = time.perf_counter()
        got = run_sam2_bench(False, setting="gpu", device="cuda", config=config, bf16=True)
        for r in got:
            _print("  ".join(f"{k}={v}" for k, v in r.items()))
        _print(f"  ({Path(config).stem}: {time.perf_counter() - t0:.1f} s in all)")
        rows.extend(got)
    return rows


def _generated_cases(folder: Path, n: int, shape: tuple[int, int, int] = CROP_SHAPE):
    from nnsam2_assets.refinement.nnunet.raw import TrainingCase

    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    for i in range(n):
        volume = two_blob_volume(shape[0], shape[1:], shift=i, seed=i)
        labels = np.stack([two_blob_annotation(volume, z)[z] for z in range(shape[0])])
        paths = folder / f"case{i:02d}_0000.nii.gz", folder / f"case{i:02d}.nii.gz"
        for array, path in ((volume, paths[0]), (labels, paths[1])):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing(CROP_SPACING_MM[::-1])
            sitk.WriteImage(image, str(path))
        cases.append(TrainingCase(f"case{i:02d}", *paths))
    return cases


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def nnunet_rows(
    iterations: int,
    device: str = "cuda",
    profiles: tuple[str, ...] = ("quick", "paper"),
    shape: tuple[int, int, int] = CROP_SHAPE,
    compile_network: bool = False,
) -> list[dict]:
    """One short training run per profile on generated scans, then a timed prediction of one of them."""
    from nnsam2_assets.core.labels import dice_per_class
    from nnsam2_assets.refinement.nnunet._common import get_profile
    from nnsam2_assets.refinement.nnunet.predict import Predictor
    from nnsam2_assets.refinement.nnunet.train import train_model

    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        cases = _generated_cases(Path(tmp) / "cases", 4, shape)
        for i, name in enumerate(profiles):
            profile = get_profile(name).replace(
                num_epochs=2,
                iterations_per_epoch=iterations,
                val_iterations_per_epoch=2,
                device=device,
                compile_network=compile_network,
            )
            t0 = time.perf_counter()
            info = train_model(
                cases, ["right", "left"], False, Path(tmp) / f"work-{name}", Path(tmp) / f"model-{name}",
                profile, 970 + i,
            )  # fmt: skip
            train_wall = time.perf_counter() - t0
            predictor = Predictor.load(info.model_dir, device=device)
            image = sitk.ReadImage(str(cases[0].image))
            predictor.predict(image)  # warm-up: cuDNN picks its kernels on the first call
            _synchronize(device)
            t1 = time.perf_counter()
            predicted = predictor.predict(image)
            _synchronize(device)
            predict_s = time.perf_counter() - t1
            truth = sitk.GetArrayFromImage(sitk.ReadImage(str(cases[0].label)))
            dice = dice_per_class(predicted, truth, 2)
            row = {
                "bench": "nnunet_gpu_iteration",
                "device": device,
                "profile": name,
                "configuration": profile.configuration,
                "iterations": profile.total_iterations,
                "compile": compile_network and device.startswith("cuda"),  # nnU-Net never compiles on CPU
                "s_per_iteration": info.seconds_per_iteration,
                "first_epoch_s": info.epoch_seconds[0],
                "s_per_iteration_last_epoch": round(info.epoch_seconds[-1] / profile.iterations_per_epoch, 4),
                "train_wall_s": round(train_wall, 1),
                "predict_s_per_scan": round(predict_s, 3),
                "dice_on_a_training_scan": [round(v, 3) for v in dice],
                "iterations_per_stage_of_profile": get_profile(name).total_iterations,
            }
            _print("  ".join(f"{k}={v}" for k, v in row.items()))
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=40, help="nnU-Net iterations per epoch (2 epochs)")
    parser.add_argument("--skip", choices=("sam2", "nnunet"), action="append", default=[])
    parser.add_argument("--device", default="cuda", help="cuda (the check), or cpu for a small smoke run")
    parser.add_argument("--profiles", nargs="+", default=["quick", "paper"], help="nnU-Net profiles")
    parser.add_argument("--shape", nargs=3, type=int, default=list(CROP_SHAPE), help="generated scans' z y x")
    parser.add_argument(
        "--compile", action="store_true", help="nnU-Net with torch.compile (its CUDA default)"
    )
    parser.add_argument("--json", default="", help="write the rows here")
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit("bench.gpu_check needs a CUDA GPU; torch.cuda.is_available() is False here")
    if not on_gpu and "sam2" not in args.skip:
        raise SystemExit("the SAM2 part runs at 1024 px and needs a GPU: add --skip sam2 on a CPU")
    gpu = torch.cuda.get_device_name(0) if on_gpu else "none"
    _print(f"machine: {machine()}; GPU: {gpu}; torch {torch.__version__}")
    t0 = time.perf_counter()
    rows = []
    if "sam2" not in args.skip:
        rows += sam2_rows()
    if "nnunet" not in args.skip:
        rows += nnunet_rows(
            args.iterations, args.device, tuple(args.profiles), tuple(args.shape), args.compile
        )
    _print(f"gpu_check done in {time.perf_counter() - t0:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "gpu": gpu, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
