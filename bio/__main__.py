"""``python -m bio ...`` (see :mod:`bio.cli`)."""

from .cli import main

if __name__ == "__main__":
    main()
