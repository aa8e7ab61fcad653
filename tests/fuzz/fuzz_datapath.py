"""Coverage-guided differential fuzzing of the datapath with atheris (libFuzzer for Python).

    python tests/fuzz/fuzz_datapath.py parse tests/fuzz/corpus/parse -runs=100000
    python tests/fuzz/fuzz_datapath.py batch tests/fuzz/corpus/batch -max_total_time=600

The first argument names the target of ``harness.TARGETS``; the rest go to libFuzzer unchanged
(a corpus directory, ``-runs``, ``-max_total_time``, ``-merge=1`` ...). Coverage is that of the
pure-Python twin (atheris instruments its bytecode) and of the harness; the Cython core is not
instrumented (its build uses gcc, not clang's sanitizer coverage) — it is checked by comparison:
every input goes through both, and any difference is a crash with the input saved by libFuzzer
as ``crash-<sha1>`` in the working directory.
"""
import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

with atheris.instrument_imports(include=["vswitch.datapath.pure", "harness"]):
    import harness
    from vswitch.datapath import pure

from vswitch.datapath import _core  # noqa: E402  (not instrumented: compiled)


def main():
    # libFuzzer runs this file again for -merge, -fork and -jobs with its own flags only: the
    # target travels in the environment
    args = sys.argv[1:]
    if args and args[0] in harness.TARGETS:
        os.environ["VSWITCH_FUZZ_TARGET"] = args.pop(0)
    name = os.environ.get("VSWITCH_FUZZ_TARGET")
    if name not in harness.TARGETS:
        print(f"usage: {sys.argv[0]} {{{'|'.join(harness.TARGETS)}}} [libFuzzer args]",
              file=sys.stderr)
        return 2
    target = harness.TARGETS[name]

    def one(data):
        target(pure, _core, data)

    atheris.Setup([sys.argv[0], *args], one)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
