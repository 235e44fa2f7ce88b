"""The package version (one place; the files record it as ``mpiattn_version``)."""

__version__ = "0.1.0"
