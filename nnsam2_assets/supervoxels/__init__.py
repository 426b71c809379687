"""Supervoxels: one slice cut into candidate segments, carried through its scan into 3-D objects.

The nnInteractive SuperVoxel recipe: SAM's automatic masks on one axial slice, propagated by SAM2 into
supervoxels. Without a SAM2 checkpoint the slice is cut by scikit-image's SLIC instead and the registration
chain carries it. Uses: centres of nnU-Net's foreground patches (``refinement.stages``), and segments to
relabel instead of drawing from scratch (``nnsam2 propose``). Dagster-free.
"""
