"""trainyard's built-in plugins: models, datasets and metrics.

Each module is a plugin of its own, reached through the ``trainyard`` entry-point group
exactly as a third-party package's plugin is. The core never imports them by name.
"""
