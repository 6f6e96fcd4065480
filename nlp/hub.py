"""Loading tokenizers and models with ``transformers``, turning failures into actionable errors."""

from __future__ import annotations

import os

__all__ = ["ModelLoadError", "load_tokenizer", "load_classifier", "is_offline"]


class ModelLoadError(OSError):
    """A tokenizer or model could not be loaded (typically: offline and not in the local cache)."""


def is_offline() -> bool:
    """Whether the Hugging Face hub is switched off (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("TRANSFORMERS_OFFLINE", "0").upper() in (
        "1",
        "ON",
        "YES",
        "TRUE",
    )


def _explain(what: str, name: str, err: Exception) -> ModelLoadError:
    if os.path.isdir(os.path.expanduser(str(name))):
        hint = f"the folder exists but is not a valid {what} directory ({err})"
    elif is_offline():
        hint = (
            "you are offline (HF_HUB_OFFLINE=1) and it is not in the local Hugging Face cache; "
            "pass a local folder that holds config.json and the weights/tokenizer files, "
            "or download it once while online"
        )
    else:
        hint = f"{type(err).__name__}: {err}"
    return ModelLoadError(f"Could not load {what} {name!r}: {hint}.")


def load_tokenizer(name_or_path: str):
    """``AutoTokenizer.from_pretrained`` with a clear error when the tokenizer is unavailable."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except Exception as err:  # noqa: BLE001
        raise _explain("tokenizer", name_or_path, err) from err


def load_classifier(name_or_path: str, num_labels: int, *, id2label: dict[int, str] | None = None):
    """``AutoModelForSequenceClassification.from_pretrained`` with a fresh head of ``num_labels``.

    ``num_labels == 1`` gives a regression head (MSE loss), as for STS-B.
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    kwargs = {"num_labels": num_labels}
    if num_labels == 1:
        kwargs["problem_type"] = "regression"
    else:
        kwargs["problem_type"] = "single_label_classification"
    if id2label:
        kwargs["id2label"] = {int(k): v for k, v in id2label.items()}
        kwargs["label2id"] = {v: int(k) for k, v in id2label.items()}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier weights" is expected here
    try:
        return AutoModelForSequenceClassification.from_pretrained(name_or_path, **kwargs)
    except Exception as err:  # noqa: BLE001
        raise _explain("model", name_or_path, err) from err
    finally:
        hf_logging.set_verbosity(verbosity)
