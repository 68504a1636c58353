"""Serving on Ray Serve: the Open Inference Protocol codec (pure), the serve config, the
Serve applications, and the deploy driver, in that order of dependence."""
