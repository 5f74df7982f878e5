"""Pure logic: no Ray, no storage, no process state - the disease-partitioning algorithm, the taxonomy and the
evaluation tasks, metrics and their intervals, operating-point decisions, image transforms, near-duplicate
hashing, the HTML report's building blocks. Imports only ``dermray.errors`` and itself (pyproject.toml's
import-linter contracts)."""
