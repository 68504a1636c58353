"""Hyperparameter search on Ray Tune: the search space, one trial, and the driver."""
