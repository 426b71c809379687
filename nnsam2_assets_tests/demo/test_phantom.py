from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml
from scipy import ndimage

from nnsam2_assets.core.imaging import read_image
from nnsam2_assets.demo import anatomy as A
from nnsam2_assets.demo import phantom as P
from nnsam2_assets.demo.datasets import write_demo_dataset
from nnsam2_assets.ingest.annotation import validate_annotation
from nnsam2_assets.ingest.convention import load_dataset
from nnsam2_assets.metrics.quant import fat_ratio

COHORT_N = 5
COHORT_SEED = 0


@pytest.fixture(scope="module")
def cohort() -> P.Cohort:
    return P.generate_cohort(COHORT_N, seed=COHORT_SEED)


@pytest.fixture(scope="module")
def typical(cohort: P.Cohort) -> P.Phantom:
    return cohort.members[cohort.typical_index]


def _arr(img: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(img)


def test_same_seed_same_phantom_and_seed_drives_only_nuisance():
    params = A.params_from_z(np.linspace(-1, 1, len(A.PARAM_SPECS)))
    a, b = P.generate_phantom(params, seed=3), P.generate_phantom(params, seed=3)
    np.testing.assert_array_equal(a.labels, b.labels)
    for name in ("water", "fat", "t2", "ct"):
        np.testing.assert_array_equal(_arr(a.images[name]), _arr(b.images[name]))
    c = P.generate_phantom(params, seed=4)
    np.testing.assert_array_equal(a.labels, c.labels)  # anatomy is the parameters' alone
    assert not np.array_equal(_arr(a.images["ct"]), _arr(c.images["ct"]))

    assert P.plan_cohort(4, seed=11) == P.plan_cohort(4, seed=11)
    assert P.plan_cohort(4, seed=11)[1] != P.plan_cohort(4, seed=12)[1]


def test_label_geometry_is_anatomical(typical: P.Phantom):
    lab, tissue = typical.labels, typical.tissue
    assert lab.dtype == np.uint8 and set(np.unique(lab)) == {0, 1, 2, 3, 4}
    midline = []
    for z in range(lab.shape[0]):
        cx = {k: np.nonzero(lab[z] == k)[1].mean() for k in (1, 2, 3, 4)}
        cy = {k: np.nonzero(lab[z] == k)[0].mean() for k in (1, 2, 3, 4)}
        # right (low x) to left: right ES, right MF, left MF, left ES
        assert cx[1] < cx[2] < cx[3] < cx[4], (z, cx)
        mid = (cx[2] + cx[3]) / 2
        midline.append(mid)
        assert abs(cx[2] - mid) < abs(cx[1] - mid) and abs(cx[3] - mid) < abs(cx[4] - mid)
        # muscles lie posterior (high y) to the canal, which lies posterior to the vertebral body / disc
        canal_y = np.nonzero(tissue[z] == A.CSF)[0].mean()
        front = np.isin(tissue[z], (A.CANCELLOUS, A.CORTICAL, A.DISC))
        front &= np.arange(lab.shape[1])[:, None] < canal_y
        assert front.any()
        assert min(cy.values()) > canal_y > np.nonzero(front)[0].mean()
    # every class on every slice, including the padding beyond the region
    assert all((lab[z] == k).any() for z in range(lab.shape[0]) for k in (1, 2, 3, 4))


def test_canonical_image_geometry(typical: P.Phantom):
    img = typical.images["t2"]
    assert img.GetPixelID() == sitk.sitkFloat32
    assert img.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    assert img.GetSpacing() == P.DEFAULT_SPACING
    assert img.GetSize()[::-1] == typical.labels.shape
    assert typical.labels.shape[1:] == P.DEFAULT_SHAPE_YX
    lo, hi = typical.region
    assert (lo, typical.labels.shape[0] - 1 - hi) == P.DEFAULT_PAD
    assert typical.level_t[lo] == 0.0 and typical.level_t[hi] == 1.0


def test_ct_hounsfield_ranges(typical: P.Phantom):
    ct, clean, tissue = _arr(typical.images["ct"]), typical.clean["ct"], typical.tissue
    far_air = ndimage.binary_erosion(tissue == A.AIR, iterations=3)
    assert abs(ct[far_air].mean() + 1000) < 2 and (clean[tissue == A.AIR] < -700).all()
    deep_fat = ndimage.binary_erosion(tissue == A.SUBCUT_FAT)
    assert -110 < np.median(clean[deep_fat]) < -80
    for k in (1, 2, 3, 4):
        assert 30 < typical.hu_truth[k] < 55
        assert 30 < ct[typical.labels == k].mean() < 55
    assert 250 < np.median(clean[tissue == A.CANCELLOUS]) < 450
    assert 500 < np.percentile(clean[tissue == A.CORTICAL], 90) < 800
    # more fat infiltration lowers muscle attenuation
    fatty = P.generate_phantom(replace(typical.params, infiltration=0.3), seed=typical.seed)
    assert all(fatty.hu_truth[k] < typical.hu_truth[k] - 3 for k in (1, 2, 3, 4))


def test_dixon_fat_ratio_matches_truth(typical: P.Phantom):
    water, fat = _arr(typical.images["water"]), _arr(typical.images["fat"])
    for k in (1, 2, 3, 4):
        truth = typical.fat_ratio_truth[k]
        assert 0.03 < truth < 0.4
        assert abs(fat_ratio(fat, water, typical.labels == k) - truth) < 0.01
    wc, fc = typical.clean["water"], typical.clean["fat"]
    deep_fat = ndimage.binary_erosion(typical.tissue == A.SUBCUT_FAT)
    assert np.median(fc[deep_fat] / (fc[deep_fat] + wc[deep_fat])) > 0.85
    lean = P.generate_phantom(replace(typical.params, infiltration=0.01, base_ff=0.015), seed=typical.seed)
    fatty = P.generate_phantom(replace(typical.params, infiltration=0.3), seed=typical.seed)
    for k in (1, 2, 3, 4):
        assert lean.fat_ratio_truth[k] < typical.fat_ratio_truth[k] < fatty.fat_ratio_truth[k]


def test_copy_slice_floor_is_hard_but_neighbours_trackable(cohort: P.Cohort):
    for ph in cohort.members:
        lo, hi = ph.region
        floor = P.copy_slice_dice(ph)  # middle region slice copied to every region slice
        assert 0.3 < floor <= 0.75, floor
        assert P.copy_slice_dice(ph, region_only=False) < floor  # padding slices differ even more
        adjacent = P.adjacent_slice_dice(ph)[lo:hi]  # neighbouring pairs inside the region
        assert adjacent.mean() >= 0.8 and adjacent.min() >= 0.75, adjacent


def test_cohort_has_one_population_mean_member(cohort: P.Cohort):
    mean = A.population_mean_params()
    assert cohort.members[cohort.typical_index].params == mean
    assert P.population_typical_index(COHORT_N, COHORT_SEED) == cohort.typical_index
    assert sum(m.params == mean for m in cohort.members) == 1
    z = np.stack([m.params.z_scores() for m in cohort.members])
    # the typical member is the cohort's medoid in parameter space (others come in +d/-d pairs)
    dist = np.linalg.norm(z[:, None] - z[None], axis=-1).sum(axis=1)
    assert int(np.argmin(dist)) == cohort.typical_index
    assert np.allclose(z[cohort.typical_index], 0)
    assert all(p == mean for p in P.plan_cohort(3, seed=1, variation=0.0)[1])


def _canonical(path: Path) -> np.ndarray:
    return _arr(sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS"))


@pytest.mark.parametrize("kind", ["dixon", "ct"])
def test_written_dataset_follows_the_convention(tmp_path: Path, kind: str):
    n, seed = 3, 5
    small = {"shape_yx": (64, 64), "spacing": (3.2, 3.2, 4.0)}  # same anatomy on a coarser grid, for speed
    folder = write_demo_dataset(tmp_path, f"demo-{kind}", kind, n_scans=n, seed=seed, annotate="top", **small)
    cohort = P.generate_cohort(n, seed, **small)
    cfg = yaml.safe_load((folder / "dataset.yaml").read_text())
    ids = [f"subj{i:02d}" for i in range(n)]
    assert cfg["reference"] == ids[cohort.typical_index]
    if kind == "ct":
        assert (cfg["modality"], cfg["sequence"]) == ("ct", "ct")
        assert cfg["label_map"] == {87: "right_lpm", 86: "left_lpm"}
    else:
        assert (cfg["modality"], cfg["sequence"]) == ("mri", "dixon")
        assert cfg["label_map"] == {1: "right_es", 2: "right_mf", 3: "left_mf", 4: "left_es"}
    assert cfg["description"]

    regions = pd.read_csv(folder / "regions.csv")
    assert list(regions.columns) == ["scan", "first_slice", "last_slice", "l4_l5"]
    assert (regions.first_slice > regions.last_slice).any()  # both index orders occur
    directions = set()
    for scan_id, ph in zip(ids, cohort.members, strict=True):
        image = folder / "scans" / (f"{scan_id}_water.nii.gz" if kind == "dixon" else f"{scan_id}.nii.gz")
        written = sitk.ReadImage(str(image))
        directions.add(written.GetDirection())
        channel = "water" if kind == "dixon" else "ct"
        # whatever the stored orientation, canonicalising gives back the phantom and its labels
        np.testing.assert_allclose(_canonical(image), _arr(ph.images[channel]), atol=1e-3)
        expert = _canonical(folder / "experts" / f"{scan_id}.nii.gz")
        want = ph.labels if kind == "dixon" else np.select([ph.labels2 == 1, ph.labels2 == 2], [87, 86], 0)
        np.testing.assert_array_equal(expert, want)
        if kind == "dixon":
            fat = folder / "scans" / f"{scan_id}_fat.nii.gz"
            assert sitk.ReadImage(str(fat)).GetSize() == written.GetSize()
        # the region rows index the file's own slice order
        row = regions[regions.scan == scan_id].iloc[0]
        lo, hi = sorted((int(row.first_slice), int(row.last_slice)))
        flipped = written.GetDirection()[8] < 0
        nz = written.GetSize()[2]
        assert (lo, hi) == ((nz - 1 - ph.region[1], nz - 1 - ph.region[0]) if flipped else ph.region)
        mid = ph.disc_slices["L4/L5"]
        assert int(row.l4_l5) == (nz - 1 - mid if flipped else mid) and lo < int(row.l4_l5) < hi
        if scan_id == cfg["reference"]:  # dataset.yaml marks the reference's region, the same row
            assert cfg["region"] == {
                "first_slice": row.first_slice,
                "last_slice": row.last_slice,
                "l4_l5": row.l4_l5,
            }
    assert len(directions) > 1  # some scans are stored non-canonically

    ann = sitk.ReadImage(str(folder / "annotation.nii.gz"))
    ref = sitk.ReadImage(str(image.parent / image.name.replace(ids[-1], cfg["reference"])))
    assert ann.GetSize() == ref.GetSize() and np.allclose(ann.GetOrigin(), ref.GetOrigin())
    arr = _arr(ann)
    nonempty = np.flatnonzero(arr.reshape(arr.shape[0], -1).any(axis=1))
    assert len(nonempty) == 1
    assert set(np.unique(arr[nonempty[0]])) - {0} == set(cfg["label_map"])

    # the project's own loader accepts it; the seed is the top (L3/L4) region slice of the reference
    spec = load_dataset(tmp_path, f"demo-{kind}")
    assert sorted(spec.scans) == ids
    reference = spec.scans[spec.reference]
    annotation = validate_annotation(
        read_image(spec.annotation), read_image(reference.image), spec, spec.annotation
    )
    ph = cohort.members[cohort.typical_index]
    assert annotation.seed_slice == ph.region[1] - ph.region[0]
    assert annotation.classes_present == tuple(range(1, spec.n_classes + 1))


def test_t2_dataset_with_chosen_reference_and_no_experts(tmp_path: Path):
    small = {"shape_yx": (64, 64), "spacing": (3.2, 3.2, 4.0)}
    other = 1 - P.population_typical_index(2, seed=2)  # override the default (typical) reference
    folder = write_demo_dataset(
        tmp_path,
        "t2set",
        "t2",
        2,
        seed=2,
        reference_index=other,
        with_experts=False,
        orientation_variety=False,
        **small,
    )
    cfg = yaml.safe_load((folder / "dataset.yaml").read_text())
    assert (cfg["modality"], cfg["sequence"], cfg["reference"]) == ("mri", "t2", f"subj{other:02d}")
    assert not (folder / "experts").exists()
    assert all(sitk.ReadImage(str(f)).GetDirection()[0] == 1.0 for f in (folder / "scans").iterdir())
    ann = _arr(sitk.ReadImage(str(folder / "annotation.nii.gz")))
    nonempty = np.flatnonzero(ann.reshape(ann.shape[0], -1).any(axis=1))
    ph = P.generate_cohort(2, 2, **small).members[other]
    assert nonempty.tolist() == [ph.seed_slice_middle]
    np.testing.assert_array_equal(ann[ph.seed_slice_middle], ph.labels[ph.seed_slice_middle])
    with pytest.raises(ValueError):
        write_demo_dataset(tmp_path, "bad", "pet", n_scans=2, seed=0)


def test_a_long_phantom_covers_t12_to_s1_with_a_disc_at_every_named_level():
    short = P.generate_phantom(seed=2)
    long = P.generate_phantom(seed=2, levels_above=3)
    assert long.region == short.region  # the levels are added above; the region keeps its slices
    assert list(long.disc_slices) == ["L5/S1", "L4/L5", "L3/L4", "L2/L3", "L1/L2", "T12/L1"]
    np.testing.assert_array_equal(long.labels[: short.region[1] + 1], short.labels[: short.region[1] + 1])
    for name, z in long.disc_slices.items():
        assert (long.tissue[z] == A.DISC).any(), name
    between = (long.disc_slices["L2/L3"] + long.disc_slices["L1/L2"]) // 2
    assert not (long.tissue[between] == A.DISC).any()  # a vertebral body between two discs
    assert all(long.labels[z].any() for z in range(long.labels.shape[0]))  # muscles on every level
