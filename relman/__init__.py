"""relman: signed software releases, served from mirrors, hot-reloaded on nodes."""

__version__ = "0.1.0"
