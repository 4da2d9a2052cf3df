"""Benchmarks, run on demand (`make bench`), not by `dvc repro`: our attribution methods against
plain autograd and Captum (`attribution`, `resnet152`), and the feature store's read paths
(`feature_store`)."""
