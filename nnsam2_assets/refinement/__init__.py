"""Steps 5-6: three sequential nnU-Net v2 stages pooled across datasets, and the final masks."""
