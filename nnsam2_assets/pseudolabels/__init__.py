"""Step 4: the confident, plausible slices of the propagated masks kept as training labels."""
