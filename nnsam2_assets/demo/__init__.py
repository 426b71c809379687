"""The demo cohort: synthetic lumbar phantoms with exact labels (``phantom``) written as dataset folders
(``datasets``). Support code for ``nnsam2 demo``, the tests and the benchmarks, not part of the pipeline."""
