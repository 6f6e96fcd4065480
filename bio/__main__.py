"""``python -m bio ...`` (see :mod:`bio.cli`); ``python -m bio export-lora`` (see :mod:`bio.export_lora`)."""

import sys

if __name__ == "__main__":
    if sys.argv[1:2] == ["export-lora"]:
        from .export_lora import main as export_lora_main

        export_lora_main(sys.argv[2:])
    else:
        from .cli import main

        main()
