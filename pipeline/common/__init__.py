"""Helpers every stage shares: configuration (Hydra composition, params mode, replicates), bad
input (DataError and the skip-or-stop policy), atomic output files, seeding. Nothing here is a
stage."""
