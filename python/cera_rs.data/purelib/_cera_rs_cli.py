"""The ``cera-rs`` command's entry point, installed beside the cera_rs package.

Importing cera_rs loads its Rust extension, which fails with a torch it has no build
for (or when a dependency is missing). An entry point inside the package would then die
in its own import with a traceback, before any code of the command runs; from here the
command says it in one line instead: ``cera-rs --version`` included, with exit status 1.
``--debug`` shows the traceback.
"""

import sys


def main() -> int:
    try:
        from cera_rs.cli import main as command
    except ImportError as err:
        if "--debug" in sys.argv[1:]:
            raise
        try:
            from importlib.metadata import version

            name = f"cera-rs {version('cera_rs')}"
        except Exception:  # metadata unreadable: the line still says what failed
            name = "cera-rs"
        reason = " ".join(str(err).split()) or type(err).__name__
        print(
            f"{name}: error: cannot import cera_rs: {reason} (--debug shows the traceback)",
            file=sys.stderr,
        )
        return 1
    return command()


if __name__ == "__main__":
    raise SystemExit(main())
