"""Artifact formats: the affine quantisation format and the packed directory's files and manifests."""
