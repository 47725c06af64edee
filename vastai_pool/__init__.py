"""A warm pool of rented Vast.ai instances, kept in a SQLite database."""

__version__ = "0.1.0"
