"""Region-finding cases with known answers, shared by the tests and ``bench/region_bench.py``.

* **Shifted real scan:** TUM02's water image with ``k`` slices cut off its lower end (k > 0) or ``-k`` empty
  slices added there (k < 0), stored with the original file's origin as a new acquisition would be: the
  region marked on the original must be found ``k`` slices lower.
* **Long phantoms:** a phantom cohort covering T12/L1 to below L5/S1 (``levels_above=3``), the reference its
  population-mean member: every member's disc slices are known exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from nnsam2_assets.demo.phantom import generate_cohort
from nnsam2_assets.ingest.region_finding import FoundRegion, find_region
from nnsam2_assets.ingest.regions import Region
from nnsam2_assets.testing.realdata import TUM

TUM_REFERENCE_REGION = Region(9, 19, 14)  # inside TUM02's 29 slices for every shift of -8..+8
SHIFTS = tuple(range(-8, 9))


@dataclass(frozen=True)
class RegionCase:
    name: str
    found: FoundRegion
    truth: Region

    @property
    def errors(self) -> tuple[int, ...]:
        """Slice error per disc (first, last, L4/L5); a lost L4/L5 counts as the region's length."""
        l4 = (
            abs(self.found.region.l4_l5 - self.truth.l4_l5)
            if self.found.region.l4_l5 is not None
            else abs(self.truth.last - self.truth.first)
        )
        return (
            abs(self.found.region.first - self.truth.first),
            abs(self.found.region.last - self.truth.last),
            l4,
        )


def shifted(image: sitk.Image, k: int) -> sitk.Image:
    arr = sitk.GetArrayFromImage(image)
    if k > 0:
        arr = arr[k:]
    elif k < 0:
        arr = np.concatenate([np.zeros((-k, *arr.shape[1:]), arr.dtype), arr])
    out = sitk.GetImageFromArray(arr)
    out.SetSpacing(image.GetSpacing())
    out.SetDirection(image.GetDirection())
    out.SetOrigin(image.GetOrigin())  # its own frame: nothing in the header tells the shift
    return out


def shifted_tum_cases(shifts: tuple[int, ...] = SHIFTS) -> list[RegionCase]:
    image = sitk.ReadImage(str(TUM / "TUM02_water.nii.gz"))
    assert image.GetSize()[2] == 29 and image.GetDirection()[8] > 0.99, "TUM02 is stored axial, z up"
    r = TUM_REFERENCE_REGION
    return [
        RegionCase(
            f"TUM02 shift {k:+d}",
            find_region(image, r, shifted(image, k)),
            Region(r.first - k, r.last - k, r.l4_l5 - k),
        )
        for k in shifts
    ]


def long_phantom_cases(n: int = 11, seed: int = 7, kind: str = "water") -> list[RegionCase]:
    cohort = generate_cohort(n, seed, pad=(3, 3), levels_above=3)
    reference = cohort.members[cohort.typical_index]

    def region(discs: dict[str, int]) -> Region:
        return Region(discs["L5/S1"], discs["L3/L4"], discs["L4/L5"])

    assert "T12/L1" in reference.disc_slices, "the long phantoms cover T12/L1"
    return [
        RegionCase(
            f"phantom {i} ({kind})",
            find_region(reference.images[kind], region(reference.disc_slices), member.images[kind]),
            region(member.disc_slices),
        )
        for i, member in enumerate(cohort.members)
        if i != cohort.typical_index
    ]


def summary(cases: list[RegionCase]) -> dict[str, float]:
    errors = [e for case in cases for e in case.errors]
    return {
        "cases": len(cases),
        "median_error": float(np.median(errors)),
        "max_error": float(max(errors)),
        "warned": sum(case.found.uncertain for case in cases),
        "beyond_2_unwarned": sum(max(case.errors) > 2 and not case.found.uncertain for case in cases),
    }
