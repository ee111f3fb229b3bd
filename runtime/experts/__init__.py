"""Routed experts on demand: their files (files.py), slot tables in host memory (slots.py), the
in-process cache tier (cache.py), per-tier statistics (stats.py) and the store that composes them
(store.py)."""
