"""``models_state`` sees a change of training recipe (trainer, foreground sampling, profile): ``nnsam2 run``
retrains instead of reusing models trained another way."""

from __future__ import annotations

import dataclasses
import json

import pytest

from nnsam2_assets.core.layout import model_pointer, model_version_dir
from nnsam2_assets.refinement import nnunet
from nnsam2_assets.refinement.models import STAGES, models_state, recipe_key
from nnsam2_assets.testing.models import write_model_stub


def test_models_trained_with_another_recipe_are_not_current(tmp_path):
    plain = nnunet.get_profile("quick")
    for stage in STAGES:
        model_dir = write_model_stub(model_version_dir(tmp_path, stage, "v1"))
        pointer = {"version": "v1", "model_dir": str(model_dir), "training_datasets": ["a"],
                   "recipe": recipe_key(plain)}  # fmt: skip
        model_pointer(tmp_path, stage).parent.mkdir(parents=True, exist_ok=True)
        model_pointer(tmp_path, stage).write_text(json.dumps(pointer))
    assert models_state(tmp_path, ["a"], recipe_key(plain)).current
    assert models_state(tmp_path, ["a"]).current  # no recipe asked for: data alone
    for other in (plain.replace(trainer="nnsam"), plain.replace(foreground_sampling="supervoxels"),
                  plain.replace(num_epochs=2), plain.replace(base_features=16), plain.replace(seed=1),
                  plain.replace(warm_start_epochs=3)):  # fmt: skip
        state = models_state(tmp_path, ["a"], recipe_key(other))
        assert not state.current and "another recipe" in state.reason


def test_the_supervoxels_phase_runs_when_the_models_sample_on_them(monkeypatch):
    from nnsam2_assets.defs.resources import FOREGROUND_SAMPLING_ENV, build_resources, resolved
    from nnsam2_assets.pipeline import default_phases

    assert default_phases() == ("datasets", "models", "outputs")
    assert default_phases(True) == ("datasets", "supervoxels", "models", "outputs")
    monkeypatch.setenv(FOREGROUND_SAMPLING_ENV, "supervoxels")
    refinement = resolved(build_resources()["refinement"])  # the environment variable, read as a run reads it
    assert refinement.foreground_sampling == "supervoxels"
    assert refinement.config().profile_obj().foreground_sampling == "supervoxels"


def test_the_network_width_reaches_the_profile(monkeypatch):
    from nnsam2_assets.defs.resources import NNUNET_BASE_FEATURES_ENV, build_resources, resolved

    default = resolved(build_resources()["refinement"])
    assert default.config().profile_obj().base_features is None  # nnU-Net's own width
    monkeypatch.setenv(NNUNET_BASE_FEATURES_ENV, "16")
    narrow = resolved(build_resources()["refinement"])
    assert narrow.config().profile_obj().base_features == 16
    for unusable in ({"profile": "paper"}, {"base_features": 2}):  # a 3d recipe, or a width too narrow
        with pytest.raises(ValueError, match="network width"):
            dataclasses.replace(narrow.config(), **unusable).profile_obj()


def test_the_training_seed_reaches_the_profile_and_the_default_keeps_the_models_versions(monkeypatch):
    from nnsam2_assets.core.cache import cache_key
    from nnsam2_assets.defs.resources import NNUNET_SEED_ENV, build_resources, resolved

    default = resolved(build_resources()["refinement"]).config().profile_obj()
    assert default.seed == 0
    # the key as it was before the seed was a setting: models trained with the default seed stay current
    assert recipe_key(default) == cache_key(repr(default), nnunet.trainer_identity(default))[:16]
    monkeypatch.setenv(NNUNET_SEED_ENV, "3")
    seeded = resolved(build_resources()["refinement"]).config().profile_obj()
    assert seeded.seed == 3 and recipe_key(seeded) != recipe_key(default)


def test_the_warm_start_reaches_the_profile_and_is_checked(monkeypatch):
    from nnsam2_assets.defs.resources import NNUNET_WARM_START_ENV, build_resources, resolved

    assert resolved(build_resources()["refinement"]).config().profile_obj().warm_start_epochs == 0
    monkeypatch.setenv(NNUNET_WARM_START_ENV, "3")
    assert resolved(build_resources()["refinement"]).config().profile_obj().warm_start_epochs == 3
    with pytest.raises(ValueError, match="warm_start_epochs"):
        nnunet.get_profile("quick", warm_start_epochs=-1)


def test_where_and_how_the_network_runs_is_not_part_of_the_recipe():
    """The device, torch's threads and the augmentation workers were in the key: switching device between
    auto, cpu and cuda retrained all three stages and rewrote every final mask. The default key stays."""
    from nnsam2_assets.core.cache import cache_key
    from nnsam2_assets.refinement import nnunet
    from nnsam2_assets.refinement.models import recipe_key

    quick = nnunet.get_profile("quick")
    before = cache_key(repr(quick), nnunet.trainer_identity(quick))[:16]  # how the key was made
    assert recipe_key(quick) == before
    for execution in ({"device": "cpu"}, {"device": "cuda"}, {"num_threads": 2, "data_workers": 4}):
        assert recipe_key(quick.replace(**execution)) == before
    assert recipe_key(quick.replace(num_epochs=9)) != before  # what it learns still counts


def test_nnsams_encoder_counts_by_its_weights_not_where_the_checkpoint_lies(tmp_path):
    """The propagation keys a checkpoint by content, so moving it re-propagates nothing; the models' recipe
    had its path as well, and the same weights in another folder retrained all three stages."""
    first, moved, other = tmp_path / "a" / "sam2.pt", tmp_path / "b" / "sam2.pt", tmp_path / "c" / "sam2.pt"
    for path, content in ((first, b"weights"), (moved, b"weights"), (other, b"other weights")):
        path.parent.mkdir()
        path.write_bytes(content)
    nnsam = nnunet.get_profile("quick").replace(trainer="nnsam")
    key = {path: recipe_key(nnsam.replace(sam2_checkpoint=str(path))) for path in (first, moved, other)}
    assert key[first] == key[moved] != key[other]
    assert key[first] != recipe_key(nnsam)  # with an encoder against the shape head alone


def test_models_that_sampled_without_supervoxels_are_stale_once_the_supervoxels_exist(tmp_path):
    """A dataset whose supervoxels were not made when the stages trained (the asset failed or was not run) got
    nnU-Net's own draw; ``nnsam2 run`` went on reusing those models after the supervoxels appeared."""
    from nnsam2_assets.core.layout import DatasetLayout

    recipe = recipe_key(nnunet.get_profile("quick").replace(foreground_sampling="supervoxels"))
    for stage in STAGES:
        model_dir = write_model_stub(model_version_dir(tmp_path, stage, "v1"))
        pointer = {"version": "v1", "model_dir": str(model_dir), "training_datasets": ["a", "b"],
                   "recipe": recipe, "supervoxel_points": {"a__s1": 12, "b__s1": None}}  # fmt: skip
        model_pointer(tmp_path, stage).parent.mkdir(parents=True, exist_ok=True)
        model_pointer(tmp_path, stage).write_text(json.dumps(pointer))
    assert models_state(tmp_path, ["a", "b"], recipe).current
    made = DatasetLayout(tmp_path, "b").supervoxels("s1")
    made.parent.mkdir(parents=True)
    made.write_bytes(b"")
    assert models_state(tmp_path, ["a"], recipe).current  # only b's case went without
    state = models_state(tmp_path, ["a", "b"], recipe)
    assert not state.current and state.reason == (
        "the stage1 model drew its patches without supervoxels in b, which has them now"
    )


def test_a_model_damaged_on_disk_is_not_current_and_is_trained_again(tmp_path):
    """A model is reused by its name, a hash of its inputs: one whose record or checkpoint came out empty (a
    crash, a full disk) counted as complete and failed every later run at its load."""
    recipe = recipe_key(nnunet.get_profile("quick"))
    for stage in STAGES:
        model_dir = write_model_stub(model_version_dir(tmp_path, stage, "v1"))
        pointer = {"version": "v1", "model_dir": str(model_dir), "training_datasets": ["a"], "recipe": recipe}
        model_pointer(tmp_path, stage).parent.mkdir(parents=True, exist_ok=True)
        model_pointer(tmp_path, stage).write_text(json.dumps(pointer))
    assert models_state(tmp_path, ["a"], recipe).current
    stage1 = model_version_dir(tmp_path, "stage1", "v1")
    checkpoint = nnunet.ModelInfo.from_dir(stage1).checkpoint
    checkpoint.write_bytes(b"")
    assert not nnunet.is_complete_model(stage1)
    state = models_state(tmp_path, ["a"], recipe)
    assert not state.current and state.reason == "the current stage1 model v1 is missing or damaged"
    checkpoint.write_bytes(b"weights")
    (stage1 / nnunet.MODEL_INFO_FILE).write_text("")
    assert not nnunet.is_complete_model(stage1) and not models_state(tmp_path, ["a"], recipe).current
