"""What every flaxlora command line shares: one-line errors, never a traceback."""

from __future__ import annotations

import argparse
import sys


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line, ``PROG: error: MESSAGE (see --help)``."""

    def error(self, message: str) -> None:
        sys.exit(f"{self.prog}: error: {message} (see --help)")

    def fail(self, error: Exception) -> None:
        """Exit with ``error`` (raised by the work, not by parsing) as one line."""
        sys.exit(f"{self.prog}: error: {error}")
