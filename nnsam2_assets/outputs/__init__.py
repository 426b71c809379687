"""Result formats for people and systems outside the platform (DICOM Segmentation objects). Dagster-free."""
