"""vswitch: a userspace virtual switch with a Cython forwarding core."""
__version__ = "0.1.0"
