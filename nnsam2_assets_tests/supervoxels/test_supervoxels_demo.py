"""The supervoxels asset on the demo cohort with the weight-free method (SLIC carried by the registration
chain), and ``nnsam2 propose`` on a demo dataset that has no annotation yet."""

from __future__ import annotations

import shutil

import dagster as dg
import numpy as np
import pandas as pd
import SimpleITK as sitk

from nnsam2_assets.cli import main as nnsam2
from nnsam2_assets.core.imaging import read_array, read_image
from nnsam2_assets.core.layout import DatasetLayout
from nnsam2_assets.definitions import all_assets
from nnsam2_assets.ingest.convention import load_dataset
from nnsam2_assets.ingest.scans import ok_scans
from nnsam2_assets.supervoxels.steps import sampling_points


def _materialize(demo_cohort, name: str) -> dg.AssetMaterialization:
    result = dg.materialize(
        all_assets(), selection=["supervoxels"], partition_key=name, instance=demo_cohort.instance,
        resources=demo_cohort.resources,
    )  # fmt: skip
    assert result.success
    return result.asset_materializations_for_node("supervoxels")[0]


def test_supervoxels_asset_on_the_demo_cohort(demo_cohort):
    for name in demo_cohort.datasets:
        first = _materialize(demo_cohort, name)
        meta = first.metadata
        layout = DatasetLayout(demo_cohort.storage_root, name)
        scans = ok_scans(layout)
        assert meta["method"].value == "slic" and meta["n_scans"].value == len(scans)
        summary = pd.read_parquet(layout.supervoxel_summary)
        for row in summary.itertuples():
            supervoxels, image = (
                read_image(layout.supervoxels(row.scan)),
                read_image(layout.scan_image(row.scan)),
            )
            assert supervoxels.GetSize() == image.GetSize() and supervoxels.GetOrigin() == image.GetOrigin()
            volume = sitk.GetArrayFromImage(supervoxels)
            assert row.n_seed_segments >= 8 and row.covered_slices > 1  # carried beyond the seed slice
            # the cut lies around the propagated muscles, which it covers
            muscles = read_array(layout.masks(row.scan))[row.seed_slice] > 0
            assert (volume[row.seed_slice][muscles] > 0).mean() > 0.95
            points = sampling_points(volume, read_array(layout.masks(row.scan)), ignore_label=None)
            assert sum(len(p) for p in points.values()) >= row.n_seed_segments // 4
        again = _materialize(demo_cohort, name)  # nothing changed: nothing recomputed, same data version
        assert again.metadata["n_recomputed"].value == 0
        assert np.array_equal(
            pd.read_parquet(layout.supervoxel_summary).sha256.to_numpy(), summary.sha256.to_numpy()
        )


def test_propose_writes_segments_of_one_slice_before_any_annotation(demo_cohort, tmp_path, capsys):
    name = demo_cohort.datasets[0]
    data = tmp_path / "data"
    shutil.copytree(demo_cohort.data_root / name, data / name)
    for annotation in (data / name).glob("annotation*"):
        annotation.unlink()
    storage = tmp_path / "storage"
    assert nnsam2(["propose", name, "--data-root", str(data), "--storage-root", str(storage)]) == 0
    out = capsys.readouterr().out
    written = next((storage / "datasets" / name / "proposals").glob("*.nii.gz"))
    assert str(written) in out
    proposal = read_image(written)
    spec = load_dataset(data, name, require_annotation=False)
    assert written.name.startswith(f"{spec.reference}_slice")
    original = read_image(spec.scans[spec.reference].image)
    assert proposal.GetSize() == original.GetSize() and proposal.GetDirection() == original.GetDirection()
    labels = sitk.GetArrayFromImage(proposal)
    slices = np.unique(np.nonzero(labels)[0])
    assert len(slices) == 1 and f"slice {slices[0]} of the scan's own file" in out
    assert labels.max() >= 8
    assert (
        nnsam2(["propose", name, "--slice", "999", "--data-root", str(data), "--storage-root", str(storage)])
        == 1
    )
    assert "outside the region" in capsys.readouterr().err
