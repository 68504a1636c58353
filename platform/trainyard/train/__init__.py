"""Training on Ray Train: the data a worker trains on, the loop each worker runs, and the
driver that starts the workers and follows them."""
