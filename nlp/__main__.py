"""``python -m nlp fit --config nlp/configs/...``: see :mod:`nlp.cli`."""

from nlp.cli import main

if __name__ == "__main__":
    main()
