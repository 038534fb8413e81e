"""Model states and metrics as Flower records, and the check of what a client sends.

Everything a ClientApp replies passes :func:`check_outgoing` first: the only array record is
the model (exactly the model's state keys, shapes and dtypes), metrics are scalars, and nothing
else (no config record, no second array record) is present. So no image, mask or prediction
can ride along by mistake.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

if TYPE_CHECKING:  # torch stays unimported in the light query handler
    from torch import Tensor

ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"


def state_to_record(state: Mapping[str, Tensor]) -> ArrayRecord:
    """A model state (parameters and buffers) as an ArrayRecord, copied to the CPU."""
    return ArrayRecord.from_torch_state_dict(dict(state))


def record_to_state(record: ArrayRecord) -> dict[str, Tensor]:
    """An ArrayRecord as writable torch tensors (the record keeps its own bytes)."""
    import torch  # noqa: F401  (flwr converts only when torch is imported)

    return {k: v.clone() for k, v in record.to_torch_state_dict().items()}


def metric_record(values: Mapping[str, float | int]) -> MetricRecord:
    """Scalar metrics; a non-scalar value is an error naming the key."""
    out: dict[str, float | int] = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"metric {key!r} must be an int or float, got {type(value).__name__}")
        out[key] = value
    return MetricRecord(out)


def reply_content(
    state: Mapping[str, Tensor] | None, metrics: Mapping[str, float | int]
) -> RecordDict:
    """The content of a client reply: the model (if any) and its scalar metrics."""
    content = RecordDict({METRICS: metric_record(metrics)})
    if state is not None:
        content[ARRAYS] = state_to_record(state)
    return content


def check_outgoing(content: RecordDict, reference: Mapping[str, Tensor] | None) -> None:
    """Raises ``ValueError`` unless ``content`` holds only the model and scalar metrics.

    ``reference`` is the model's own state dict: an array record must have exactly its keys,
    shapes and dtypes. Without one (the light query handler, which returns a stored copy that
    was built from the model's state) only the kinds of records are checked.
    """
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            if reference is not None:
                _check_model_arrays(name, record, reference)
        elif isinstance(record, MetricRecord):
            bad = [k for k, v in record.items() if not isinstance(v, int | float)]
            if bad:
                raise ValueError(f"outgoing metric record {name!r}: non-scalar values {bad}")
        elif isinstance(record, ConfigRecord):
            raise ValueError(f"outgoing record {name!r}: a client sends no config record")
        else:
            raise ValueError(f"outgoing record {name!r}: unexpected {type(record).__name__}")
    arrays = [n for n, r in content.items() if isinstance(r, ArrayRecord)]
    if len(arrays) > 1:
        raise ValueError(f"outgoing message carries {len(arrays)} array records {arrays}")


def _check_model_arrays(name: str, record: ArrayRecord, reference: Mapping[str, Tensor]) -> None:
    if list(record.keys()) != list(reference.keys()):
        extra = sorted(set(record) - set(reference))
        missing = sorted(set(reference) - set(record))
        raise ValueError(
            f"outgoing array record {name!r} is not the model state: unexpected keys "
            f"{extra[:5]}, missing keys {missing[:5]}"
        )
    for key, array in record.items():
        ref = reference[key]
        dtype = str(ref.dtype).removeprefix("torch.")
        if tuple(array.shape) != tuple(ref.shape) or array.dtype != dtype:
            raise ValueError(
                f"outgoing array {key!r}: shape {tuple(array.shape)} dtype {array.dtype}, "
                f"the model has {tuple(ref.shape)} {dtype}"
            )


def float_metrics(record: MetricRecord | None) -> dict[str, float]:
    """A metric record as plain floats (lists are not expected from our clients)."""
    return {k: float(v) for k, v in (record or {}).items() if isinstance(v, int | float)}
