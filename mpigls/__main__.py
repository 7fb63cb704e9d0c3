"""``python -m mpigls`` is the ``mpigls`` command.

Two things only this entry point can do:

* A folder named ``mpigls`` in the current directory (the checkout, seen from its parent folder)
  is taken by Python's path finder for a namespace package before an editable install's finder
  (setuptools appends it after the path finder) is asked, so ``mpigls`` would be that empty
  folder. Then the package is imported again with the directories holding such a folder left out.
* Under ``python -m mpi4py`` a ``SystemExit`` with a non-zero code becomes ``MPI_Abort``, which
  prints an abort line after a one-rank job's error paragraph. A non-zero code that ``main``
  returns (with several ranks it never returns one) ends the process with exactly that code.
"""

import os
import sys
from pathlib import Path


def _import_the_package() -> None:
    pkg = sys.modules.get(__package__ or "mpigls")
    if pkg is None or getattr(pkg, "__file__", None) is not None:
        return  # the regular package

    def shadows(entry: str) -> bool:
        folder = Path(entry or ".") / "mpigls"
        return folder.is_dir() and not (folder / "__init__.py").is_file()

    saved = list(sys.path)
    sys.path[:] = [p for p in saved if not shadows(p)]
    del sys.modules["mpigls"]
    try:
        import mpigls  # noqa: F401  (the installed package, found by the editable finder)
    except ImportError:
        sys.modules["mpigls"] = pkg
    finally:
        sys.path[:] = saved


_import_the_package()

from mpigls.cli import main  # noqa: E402

if __name__ == "__main__":
    code = main()
    if code and "mpi4py.MPI" in sys.modules and "mpi4py.run" in sys.modules:
        from mpigls.parallel.exitcodes import flush_std

        flush_std()
        os._exit(code)
    sys.exit(code)
