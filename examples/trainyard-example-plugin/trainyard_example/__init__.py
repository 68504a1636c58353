"""An example third-party trainyard plugin (see ``trainyard_example.plugin``)."""

__version__ = "0.1.0"
