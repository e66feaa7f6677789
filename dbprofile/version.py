"""The package version, in a module of its own so that any layer may read it without importing
the package front door (``dbprofile/__init__``), which imports the layers above."""

__version__ = "0.1.0"
