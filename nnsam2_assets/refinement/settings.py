"""The nnU-Net recipe of a run, as plain values: a named profile and what overrides it. The Dagster resource
(``defs.resources.RefinementSettings``) is its configuration schema, and code without Dagster (the direct
pipeline, benchmarks, tests) builds one itself."""

from __future__ import annotations

from dataclasses import dataclass

from nnsam2_assets.refinement.nnunet import Profile, get_profile


@dataclass(frozen=True)
class RefinementConfig:
    """nnU-Net profile (``quick`` for CPU, ``paper`` for a GPU) and optional iteration overrides."""

    profile: str = "quick"
    num_epochs: int = 0  # 0 = profile default
    iterations_per_epoch: int = 0
    device: str = "auto"
    # "plain" nnU-Net, or "nnsam": a frozen SAM2 image encoder from ``sam2_checkpoint`` beside nnU-Net's and a
    # level-set shape head (the head alone when there is no checkpoint)
    trainer: str = "plain"
    level_set_weight: float = 0.1
    # the propagation settings' checkpoint and config (they must match)
    sam2_checkpoint: str = ""
    sam2_config: str = ""
    sam2_image_size: int = 256
    # benchmarks of nnSAM's plumbing only: a random-weight encoder when there is no checkpoint (the model's
    # record then names the encoder "...:random:<size>")
    sam2_random_weights: bool = False
    # where nnU-Net centres its foreground patches: uniformly inside the pseudo-labels, or on the dataset's
    # supervoxels (the ``supervoxels`` asset)
    foreground_sampling: str = "pseudo_labels"
    # the 2d network's first-stage width; 0 keeps the profile's (nnU-Net's 32). 16 trains about 3x faster per
    # iteration on CPU, at an accuracy cost that the ablation table of docs/accuracy.md gives
    base_features: int = 0
    # the training seed; another seed trains other models from the same labels, which is how a study measures
    # the spread that training adds to its numbers (README, accuracy)
    training_seed: int = 0
    # stages 2 and 3 start from the previous stage's weights and train this many epochs; 0 keeps the profile's
    # rule (``Profile.warm_start_epochs``)
    warm_start_epochs: int = 0

    def __post_init__(self) -> None:
        for name in (
            "num_epochs",
            "iterations_per_epoch",
            "base_features",
            "training_seed",
            "warm_start_epochs",
        ):
            value = getattr(self, name)
            if value < 0:  # a negative count would be taken as an override and train nothing
                raise ValueError(f"refinement setting {name} is {value}: use 0 (the profile's own) or more")

    def profile_obj(self) -> Profile:
        overrides: dict = {"device": self.device, "foreground_sampling": self.foreground_sampling}
        if self.trainer != "plain":
            overrides.update(trainer=self.trainer, level_set_weight=self.level_set_weight,
                             sam2_checkpoint=self.sam2_checkpoint, sam2_config=self.sam2_config,
                             sam2_image_size=self.sam2_image_size,
                             sam2_random_weights=self.sam2_random_weights)  # fmt: skip
        if self.num_epochs:
            overrides["num_epochs"] = self.num_epochs
        if self.iterations_per_epoch:
            overrides["iterations_per_epoch"] = self.iterations_per_epoch
        if self.base_features:
            overrides["base_features"] = self.base_features
        if self.training_seed:
            overrides["seed"] = self.training_seed
        if self.warm_start_epochs:
            overrides["warm_start_epochs"] = self.warm_start_epochs
        return get_profile(self.profile, **overrides)
