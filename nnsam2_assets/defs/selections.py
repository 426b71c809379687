"""Named asset selections shared by the runner, the new-data sensor, jobs, tests and benchmarks."""

PER_DATASET = [
    "scans",
    "reference_annotation",
    "reference_ranking",
    "frame_stacks",
    "propagated_masks",
    "pseudo_labels",
]
MODELS = ["nnunet_stage1", "nnunet_stage2", "nnunet_stage3"]
OUTPUTS = ["final_masks", "scan_metrics", "agreement"]
