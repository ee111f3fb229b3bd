"""Conversion: synthesise, download, extract, repack, verify and describe model artifacts."""
