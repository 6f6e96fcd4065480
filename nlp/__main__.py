"""``python -m nlp fit --config nlp/configs/...``: see :mod:`nlp.cli`; ``python -m nlp export-lora``: see
:mod:`nlp.export_lora`."""

import sys

if __name__ == "__main__":
    if sys.argv[1:2] == ["export-lora"]:
        from nlp.export_lora import main as export_lora_main

        export_lora_main(sys.argv[2:])
    else:
        from nlp.cli import main

        main()
