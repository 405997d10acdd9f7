"""The repository format: blobs, manifests, the SQLite index, signing and verification.

This package imports nothing from ``relman.mirror`` or ``relman.client``.
"""
