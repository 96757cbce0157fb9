"""The labels and annotations every renderer puts on what it creates, and label-safe values."""

from __future__ import annotations

import hashlib
import re

LABEL_NAME = "app.kubernetes.io/name"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_APPLICATION = "arks.ai/application"
LABEL_MODEL = "arks.ai/model"
LABEL_SERVED_NAME = "arks.ai/served-model-name"
LABEL_ROLE = "arks.ai/role"
LABEL_COMPONENT = "arks.ai/component"
ANNOTATION_SERVED_NAME = "arks.ai/served-model-name"

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def label_value(value: str) -> str:
    """`value` if it is a valid label value, else a readable form with a hash suffix.

    Served names such as `meta-llama/Llama-3.1-8B` contain `/`; the exact name is kept in
    an annotation, the label only has to be stable and equal for equal names.
    """
    if len(value) <= 63 and _LABEL_VALUE.match(value):
        return value
    digest = hashlib.sha256(value.encode()).hexdigest()[:10]
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "-", value)[:52].strip("-_.")
    return f"{readable}-{digest}" if readable else digest
