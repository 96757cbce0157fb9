"""ArksModel: a model, where to fetch it from, and where to keep it."""

from __future__ import annotations

from arks.crds.render import Column, Kind
from arks.crds.schema import (
    NAME_PATTERN,
    QUANTITY_PATTERN,
    array,
    boolean,
    conditions,
    map_of,
    obj,
    observed_generation,
    rule,
    secret_key_ref,
    string,
)

PHASES = ("Pending", "StorageCreating", "Downloading", "Ready", "Failed")
SOURCES = ("huggingface", "modelscope", "s3", "url", "pvc")
ACCESS_MODES = ("ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod")

_REPO = r"^[A-Za-z0-9][-A-Za-z0-9_.]*/[A-Za-z0-9][-A-Za-z0-9_.]*$"

# CEL has no "count the set fields", so sum one per source.
EXACTLY_ONE_SOURCE = " + ".join(f"(has(self.{s}) ? 1 : 0)" for s in SOURCES) + " == 1"

source = obj(
    {
        "huggingface": obj(
            {
                "repo": string("Repository id, e.g. Qwen/Qwen2.5-7B-Instruct.", pattern=_REPO),
                "revision": string("Branch, tag or commit.", min_length=1, default="main"),
                "tokenSecretRef": secret_key_ref(
                    "Secret key holding a Hugging Face access token, for gated models.", "token"
                ),
            },
            "Download from the Hugging Face Hub.",
            required=["repo"],
        ),
        "modelscope": obj(
            {
                "repo": string("Repository id, e.g. Qwen/Qwen2.5-7B-Instruct.", pattern=_REPO),
                "revision": string("Branch, tag or commit.", min_length=1, default="master"),
            },
            "Download from ModelScope.",
            required=["repo"],
        ),
        "s3": obj(
            {
                "endpoint": string(
                    "S3 endpoint URL; empty means AWS.", pattern=r"^https?://[^\s]+$"
                ),
                "bucket": string("Bucket name.", pattern=r"^[a-z0-9][-a-z0-9.]{1,61}[a-z0-9]$"),
                "prefix": string("Key prefix of the model files inside the bucket.", default=""),
                "credentialsSecretRef": obj(
                    {"name": string("Name of the Secret.", pattern=NAME_PATTERN, max_length=253)},
                    "Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.",
                    required=["name"],
                ),
            },
            "Copy from an S3-compatible bucket.",
            required=["bucket"],
        ),
        "url": obj(
            {
                "url": string(
                    "HTTP(S) URL of an archive of the model.", pattern=r"^https?://[^\s]+$"
                )
            },
            "Download one archive over HTTP(S).",
            required=["url"],
        ),
        "pvc": obj(
            {
                "claimName": string(
                    "PersistentVolumeClaim already holding the model.",
                    pattern=NAME_PATTERN,
                    max_length=253,
                ),
                "subPath": string("Directory of the model inside the volume.", default=""),
            },
            "The model is already on a PVC in this namespace; nothing is downloaded.",
            required=["claimName"],
        ),
    },
    "Where the model comes from. Exactly one source must be set.",
    rules=[rule(EXACTLY_ONE_SOURCE, f"exactly one of {', '.join(SOURCES)} must be set")],
)

storage = obj(
    {
        "size": string(
            "Capacity of the PVC the model is downloaded to, e.g. 100Gi.", pattern=QUANTITY_PATTERN
        ),
        "storageClassName": string("StorageClass of the PVC; empty uses the cluster default."),
        "accessModes": array(
            string("A PersistentVolume access mode.", enum=ACCESS_MODES),
            "Access modes of the PVC; ReadWriteMany lets replicas on many nodes share it.",
            min_items=1,
            max_items=4,
            set_like=True,
        ),
    },
    "The PVC the controller creates for a downloaded model.",
    required=["size"],
)

node_cache = obj(
    {
        "enabled": boolean("Preload the model to a host path on matching nodes.", default=False),
        "nodeSelector": map_of(
            string(), "Nodes to preload on; empty means every node that runs an engine."
        ),
        "path": string(
            "Host directory of the cache: one the cluster allows (the controller's --cache-root, "
            "/var/lib/arks/models by default), not a directory under it; another is refused "
            "(CacheReady PathNotAllowed).",
            pattern=r"^/",
            default="/var/lib/arks/models",
        ),
    },
    "An optional node-local copy, so engines start without reading the network volume.",
)

spec = obj(
    {"source": source, "storage": storage, "nodeCache": node_cache},
    "What model to fetch and where to keep it.",
    required=["source"],
    rules=[
        rule(
            "has(self.source.pvc) || has(self.storage)",
            "storage is required unless source.pvc names an existing claim",
            reason="FieldValueRequired",
        ),
        rule(
            "!(has(self.source.pvc) && has(self.storage))",
            "storage must not be set with source.pvc: the claim already exists",
            reason="FieldValueForbidden",
        ),
        rule("self.source == oldSelf.source", "source is immutable; create a new ArksModel"),
    ],
)

status = obj(
    {
        "phase": string("Where the model is in its life cycle.", enum=PHASES),
        "observedGeneration": observed_generation(),
        "conditions": conditions(),
        "claimName": string("The PVC holding the model.", pattern=NAME_PATTERN),
        "warmNodes": array(
            string("A node name."),
            "Nodes whose local cache holds the model.",
            set_like=True,
        ),
    },
    "Observed state, written by the controller.",
)

KIND = Kind(
    kind="ArksModel",
    plural="arksmodels",
    short_names=("am",),
    description="ArksModel is a model and where to get it: Hugging Face, ModelScope, S3, a URL, or a PVC.",
    spec=spec,
    status=status,
    columns=(
        Column("Phase", ".status.phase"),
        Column("Size", ".spec.storage.size"),
        Column("Claim", ".status.claimName", priority=1),
    ),
)
