"""Steps 2-3: the annotated slice carried to every slice of every scan (registration or SAM2 backend, with
SAM2's interleaved frames), with a per-slice confidence."""
