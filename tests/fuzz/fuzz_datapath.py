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
    if len(sys.argv) < 2 or sys.argv[1] not in harness.TARGETS:
        print(f"usage: {sys.argv[0]} {{{'|'.join(harness.TARGETS)}}} [libFuzzer args]",
              file=sys.stderr)
        return 2
    target = harness.TARGETS[sys.argv[1]]

    def one(data):
        target(pure, _core, data)

    atheris.Setup([sys.argv[0], *sys.argv[2:]], one)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
