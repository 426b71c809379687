"""A stage model's predictions of the pool's scans: inside each scan's muscle box, cached by the scan's content
and box, with one predictor load per stage and run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnsam2_assets.core import Log
from nnsam2_assets.core.cache import ScanCache
from nnsam2_assets.core.imaging import read_image
from nnsam2_assets.core.layout import DatasetLayout, stage_prediction
from nnsam2_assets.core.storage import atomic_write_image, sha256_file
from nnsam2_assets.refinement import nnunet
from nnsam2_assets.refinement.pool import Pool
from nnsam2_assets.refinement.roi import Roi, roi_from_mask


def scan_key(layout: DatasetLayout, scan: str) -> str:
    return sha256_file(layout.scan_image(scan))[:24]


def scan_roi(layout: DatasetLayout, scan: str, margin_mm: float | None) -> Roi | None:
    """The scan's muscle box from its propagated mask (None: whole slices, by profile or empty mask)."""
    if margin_mm is None or not layout.masks(scan).exists():
        return None
    return roi_from_mask(read_image(layout.masks(scan)), margin_mm)


def input_key(content_key: str, roi: Roi | None) -> str:
    """What a prediction depends on: the scan's content (``scan_key``) and the box it is cropped to."""
    return content_key + ("" if roi is None else f"-{roi.key()}")


def predict_scan(predictor: nnunet.Predictor, img: sitk.Image, roi: Roi | None) -> sitk.Image:
    """One scan's labels on its full canonical grid (predicted inside ``roi`` when given)."""
    if roi is None:
        arr = predictor.predict(img)
    else:
        size = img.GetSize()
        arr = roi.paste(predictor.predict(roi.crop(img)), (size[2], size[1], size[0]))
    out = sitk.GetImageFromArray(arr.astype(np.uint8))
    out.CopyInformation(img)
    return out


class StagePredictions:
    """One stage's per-scan predictions, cached by scan content and box; its nnU-Net predictor loads at most
    once, and only when some scan needs predicting."""

    def __init__(self, model_dir: Path, device: str):
        self.model_dir, self.device = Path(model_dir), device
        self._predictor: nnunet.Predictor | None = None

    @property
    def loaded(self) -> bool:
        return self._predictor is not None

    def ensure(
        self, dataset: str, scan: str, image: Callable[[], sitk.Image], content_key: str, roi: Roi | None
    ) -> tuple[Path, bool]:
        """The scan's prediction file, predicted now (``image()`` read only then) unless it is current.
        Returns (path, predicted now)."""
        path = stage_prediction(self.model_dir, dataset, scan)
        cache = ScanCache(path.parent)
        key = input_key(content_key, roi)
        if cache.is_fresh(scan, key, [path]):
            return path, False
        if self._predictor is None:
            self._predictor = nnunet.Predictor.load(self.model_dir, device=self.device)
        cache.invalidate(scan)
        atomic_write_image(predict_scan(self._predictor, image(), roi), path)
        cache.record(scan, key)
        return path, True


def predict_pool(
    model_dir: Path, pool: Pool, device: str, log: Log, roi_margin_mm: float | None = None
) -> int:
    """Predict every scan of the pool with one predictor load; cached per scan content (and box)."""
    predictions, n = StagePredictions(model_dir, device), 0
    for dataset, scan, layout in pool.items():
        roi = scan_roi(layout, scan, roi_margin_mm)
        _, predicted = predictions.ensure(
            dataset,
            scan,
            lambda layout=layout, scan=scan: read_image(layout.scan_image(scan)),
            scan_key(layout, scan),
            roi,
        )
        n += predicted
    log(f"predicted {n} scan(s) with {model_dir.name}")
    return n
