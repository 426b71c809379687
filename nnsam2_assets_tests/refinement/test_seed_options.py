"""The seed-method options through a real (tiny) stage 1: the nnSAM trainer without a checkpoint trains the
shape head alone and says so in the model record and the asset's metadata; supervoxel sampling hands each
training case its supervoxel patch centres and records how many; a training seed other than the default
reaches the model and its record."""

from __future__ import annotations

import json

from nnsam2_assets.core.layout import model_pointer
from nnsam2_assets.defs.refinement import _result
from nnsam2_assets.refinement import stages
from nnsam2_assets.refinement.models import recipe_key
from nnsam2_assets.refinement.nnunet import ModelInfo
from nnsam2_assets.refinement.settings import RefinementConfig
from nnsam2_assets.testing import direct
from nnsam2_assets.testing.cohorts import write_tiny_dataset


def test_shape_head_alone_and_supervoxel_sampling_in_stage1(tmp_path):
    data, storage = tmp_path / "data", tmp_path / "storage"
    write_tiny_dataset(data, "ds", 2, seed=3)
    settings = RefinementConfig(num_epochs=1, iterations_per_epoch=2, trainer="nnsam",
                                foreground_sampling="supervoxels", training_seed=7)  # fmt: skip
    run = direct.DirectRun(data, storage, ["ds"], settings)
    direct.run_direct(run, phases=("datasets", "supervoxels"))
    result = stages.run_stage1(run.pool(), storage, settings.profile_obj(), log=lambda _: None)
    assert result.trainer["trainer"] == "nnUNetTrainerNnSAMNoMirroring"
    assert result.trainer["sam_encoder"] == "none" and result.trainer["sam_level"] is None
    info = ModelInfo.from_dir(result.model_dir)
    assert info.nnsam["sam_encoder"] == "none" and info.seed == 7
    metadata = _result(result).metadata
    assert metadata["trainer"].value["sam_encoder"] == "none"
    assert metadata["trainer"].value["training_seed"] == 7
    pointer = json.loads(model_pointer(storage, "stage1").read_text())
    assert pointer["supervoxel_points"] and all(n and n > 0 for n in pointer["supervoxel_points"].values())
    assert pointer["recipe"] == recipe_key(settings.profile_obj())
    # the same inputs with nnU-Net's own sampling are another model
    plain = RefinementConfig(num_epochs=1, iterations_per_epoch=2, trainer="nnsam")
    again = stages.run_stage1(run.pool(), storage, plain.profile_obj(), log=lambda _: None)
    assert again.version != result.version
    assert set(json.loads(model_pointer(storage, "stage1").read_text())["supervoxel_points"]) == set()


def test_supervoxels_of_an_earlier_crop_give_no_sampling_points(tmp_path):
    """The supervoxels asset is not upstream of the stages: after a new region its files are those of the
    old crop until it is materialized again. Their points had been taken as they were (another crop's
    positions; a crop of another size failed the stage)."""
    import numpy as np
    import SimpleITK as sitk

    from nnsam2_assets.core.storage import atomic_write_image

    data, storage = tmp_path / "data", tmp_path / "storage"
    write_tiny_dataset(data, "ds", 2, seed=3)
    run = direct.DirectRun(data, storage, ["ds"])
    direct.run_direct(run, phases=("datasets", "supervoxels"))
    layout = run.layout("ds")
    scan = "subj01"
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(layout.pseudo_label(scan))))
    image = sitk.ReadImage(str(layout.scan_image(scan)))
    points, digest = stages.supervoxel_points(layout, scan, image, None, labels, 255)
    assert points and digest.startswith(stages.SAMPLING_VERSION)

    current = sitk.ReadImage(str(layout.supervoxels(scan)))
    shorter = current[:, :, 1:]  # as of a crop one slice shorter at its inferior end
    atomic_write_image(shorter, layout.supervoxels(scan))
    assert stages.supervoxel_points(layout, scan, image, None, labels, 255) == (None, "stale-supervoxels")
    moved = sitk.Image(current)
    moved.SetOrigin(tuple(np.add(current.GetOrigin(), (0.0, 0.0, 3.0))))  # the same size, another level
    atomic_write_image(moved, layout.supervoxels(scan))
    assert stages.supervoxel_points(layout, scan, image, None, labels, 255) == (None, "stale-supervoxels")
