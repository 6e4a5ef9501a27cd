"""Paged attention behind a small interface: the metadata one step needs, and the backends."""
