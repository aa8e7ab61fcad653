"""The vswitch CNI plugin, installed as the package ``vswitch_cni`` (this folder is ``cni/``
in the checkout). Imports nothing beyond the standard library and vswitch's stdlib-only
modules."""
if __name__ != "vswitch_cni":   # one module, one name: never both cni.x and vswitch_cni.x
    raise ImportError(f"the CNI plugin package is vswitch_cni; it was imported as {__name__!r} "
                      "(import vswitch_cni, installed by pip install -e . or the wheel)")
