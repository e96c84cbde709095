"""The package version, one place (the artifacts record it; the CLI prints it)."""
__version__ = "0.1.0"
