"""The vswitch CNI plugin. Imports nothing beyond the standard library."""
