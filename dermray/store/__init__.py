"""Storage and artefacts: reading and writing by URI (local paths and S3), lineage fingerprints, table schemas,
model weights, prediction tables, the project's definitions (taxonomy, tasks), tar archives. Imports the pure logic
below it, never Ray's runtime or a stage."""
