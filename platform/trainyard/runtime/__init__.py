"""What every driver stands on: connecting to Ray, storage paths and URIs, and the
resources a job asks of the cluster. Knows nothing of training, tuning or serving."""
