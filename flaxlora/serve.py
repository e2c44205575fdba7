"""``python -m flaxlora.serve``: the HTTP endpoint of :mod:`flaxlora.qqp.server` (many adapters, one base)."""

from flaxlora.qqp.server import main

if __name__ == "__main__":
    main()
