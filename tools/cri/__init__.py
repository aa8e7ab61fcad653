"""A small CRI v1 client (see client.py)."""
from .client import CriClient, CriError, PodSpec, PortMapping, load_api

__all__ = ["CriClient", "CriError", "PodSpec", "PortMapping", "load_api"]
