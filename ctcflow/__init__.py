"""ctcflow: the domain code shared by the DVC stages and the Prefect flows.

text ↔ tokens (`text`), audio I/O (`audio`), features and SpecAugment (`features`),
models (`model`), CTC loss and blank penalties (`losses`), decoding (`decoding`),
WER/CER (`metrics`), batching (`data`), manifests (`manifest`), params (`params`).
"""

__version__ = "0.1.0"
