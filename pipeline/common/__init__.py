"""Helpers every stage shares: configuration (Hydra composition, params mode, replicates), atomic
output files, seeding. Nothing here is a stage."""
