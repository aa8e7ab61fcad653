# Puts the repository root on sys.path for pytest (rootdir conftest), so tests import
# the working tree's vswitch/ and cni/ even before `pip install -e .`.
