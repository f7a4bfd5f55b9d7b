"""The labelling job on Ray Data: stages, the Parquet sink, progress, run_job. The only layer
that imports Ray at module level."""
