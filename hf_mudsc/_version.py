"""The package version (read by pyproject.toml, the CLI, the card and the recipe)."""

__version__ = "0.1.0"
