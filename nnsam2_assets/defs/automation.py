"""Execution policy shared by the asset modules: when derived assets rerun, and what a GPU step asks for."""

from __future__ import annotations

import dagster as dg
from dagster_celery.tags import DAGSTER_CELERY_QUEUE_TAG

from nnsam2_assets.executors import GPU_QUEUE


# Derived assets follow their inputs and their own code. Label "eager_or_code_version_changed":
#   * eager, but on a dependency's DATA VERSION change, not on any new materialization: an unchanged result
#     (same content hash, e.g. a manual or nightly rerun with the same inputs) does not cascade downstream.
#     Built-in eager() uses any_deps_updated(), which fires on every new materialization even when its data
#     version is the same (the automation tests show it). Otherwise the same as
#     eager(): newly missing partitions run, deps requested on this tick pull this asset into the same run
#     (will_be_requested), never while a dep is missing or in progress, once per change (since_last_handled);
#   * OR its own code version changed (eager() alone ignores code-version bumps), under the same guards.
def eager(ignoring: tuple[str, ...] = ()) -> dg.AutomationCondition:
    """The policy above; ``ignoring`` names dependencies that neither trigger nor hold back the asset (an
    external asset reported only now and then, such as ``corrections``, would otherwise count as missing
    for every partition it was never reported for)."""
    changed = dg.AutomationCondition.any_deps_match(
        (
            dg.AutomationCondition.data_version_changed()
            & ~dg.AutomationCondition.executed_with_root_target()
        ).with_label("data_version_changed_without_root")
        | dg.AutomationCondition.will_be_requested()
    )
    missing = dg.AutomationCondition.any_deps_missing()
    if ignoring:
        changed = changed.ignore(dg.AssetSelection.assets(*ignoring))
        missing = missing.ignore(dg.AssetSelection.assets(*ignoring))
    # code_version_changed() is true for every partition: it shares the guards, or a bump requested datasets
    # never ingested (failing runs) and ones with a run under way
    return (
        dg.AutomationCondition.in_latest_time_window()
        & (
            (
                dg.AutomationCondition.newly_missing() | changed.with_label("any_deps_data_version_changed")
            ).since_last_handled()
            | dg.AutomationCondition.code_version_changed()
        )
        & ~missing
        & ~dg.AutomationCondition.any_deps_in_progress()
        & ~dg.AutomationCondition.in_progress()
    ).with_label("eager_or_code_version_changed")


EAGER = eager()
# final masks follow the models and the scans; a recorded correction requests its own run (new-data sensor)
EAGER_BESIDE_CORRECTIONS = eager(ignoring=("corrections",))

# GPU steps: one at a time per instance (pool limit in dagster.yaml), a k8s GPU request when the
# k8s_job_executor runs one pod per step, and the Celery queue that only GPU workers listen on.
GPU_TAGS = {
    "dagster-k8s/config": {
        "container_config": {
            "resources": {"requests": {"nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "1"}}
        }
    },
    DAGSTER_CELERY_QUEUE_TAG: GPU_QUEUE,
}
