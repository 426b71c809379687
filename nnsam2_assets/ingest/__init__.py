"""Step 1: the dataset convention, scans (orientation, region crop, Dixon pairing), the one annotation and the
advisory reference ranking."""
