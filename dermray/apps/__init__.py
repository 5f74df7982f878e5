"""Applications composed of stages: the pipeline, the nightly scoring job, the lineage report, the doctor, the
dataset importers and the synthetic-study generator. The command line (``dermray.cli``) sits above them."""
