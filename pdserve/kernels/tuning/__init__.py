"""Tile and threshold tables for the Triton kernels: one JSON file per device family (tables.py)."""
