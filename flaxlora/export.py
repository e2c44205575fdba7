"""``python -m flaxlora.export``: the command line of :mod:`flaxlora.interop.export`."""

from flaxlora.interop.export import main

if __name__ == "__main__":
    main()
