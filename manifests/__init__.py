"""Data shipped with fmoe: model presets (geometry of each released model) and hub repository aliases.

Read through :mod:`fmoe.presets`, never by path.
"""
