"""The library under the evaluation stages: statistics, reading the attribution store, human
and ground-truth maps at a common resolution, and writing tables and figures. The protocols each
stage implements are in docs/evaluation.md."""
