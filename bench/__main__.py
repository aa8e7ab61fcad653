"""``python -m bench`` (console script ``vswitch-bench``): run the benchmarks and report.

Theory of operation: a thin entry point; ``bench.runner`` does the work (pytest with
pytest-benchmark on bench/bench_*.py in a child process, a progress display, then the
Markdown report, plots and optional comparison in ``bench/results/<timestamp>/``).
See bench/README.md for the options and the convention benchmark files follow.
"""
import sys


def main(argv=None):
    if (sys.argv[1:] if argv is None else argv) == ["--version"]:
        from vswitch import __version__
        print(f"vswitch-bench {__version__}")
        return 0
    from .runner import main as run
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
