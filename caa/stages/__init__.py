"""The pipeline's stages: ingest, extract, compute-vectors, sweep, generate, export and import, and
the checks and plans they share."""
