"""``python -m flaxlora.predict``: the command line of :mod:`flaxlora.qqp.predict`."""

from flaxlora.qqp.predict import main

if __name__ == "__main__":
    main()
