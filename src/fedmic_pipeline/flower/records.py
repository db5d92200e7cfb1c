"""Core payloads <-> Flower records, the client's private state, and bytes on the wire.

Payloads (``dict[str, torch.Tensor]``) travel as one ``ArrayRecord``: one ``Array`` per
entry, keyed by the payload's own key -- FedMIC's SVD factors keep keys like
``body.6.weight::U`` and ``__meta__::version``; ArrayRecord keys are free strings -- in
numpy's ``.npy`` format, so every numpy dtype (float32, float16, int64, bool, ...),
0-d scalars and empty ``(m, 0)`` factors round-trip bit for bit, in insertion order.
bfloat16 has no numpy dtype and is refused with a clear error (payloads never use it:
AMP only changes the compute dtype).

The client's private state (teacher, projections, optimizer state, error-feedback
residuals, ...) must outlive the ClientApp process: a SuperNode starts a fresh
``flwr-clientapp`` process for every message (``SubprocessExecutor.launch`` in Flower
1.41), so a module-level cache would be empty at every round. What does persist is
``context.state``, a ``RecordDict`` the SuperNode keeps per run and hands to the next
ClientApp process. Its records hold arrays and scalars, not torch modules with optimizers
bound to their parameters, so the whole client state is stored with one ``torch.save``
(which keeps the module <-> optimizer parameter sharing) as bytes in a ``ConfigRecord``.
That blob never leaves the node (``context.state`` is local by Flower's contract); it is
unpickled only by the node that wrote it, and is tagged with run id, partition id and
algorithm so a mismatching blob is rejected instead of silently reused.

Bytes on the wire: Flower 1.41 splits a message into content-addressed objects (Message,
RecordDict, ArrayRecord, Array, ArrayChunk, ...) and transfers each unique object once per
message, as the payload of a ``PushObjectRequest``/``PullObjectResponse``.
``message_wire_nbytes`` sums the serialized protobuf size of those object transfers
(object id + object content); what it leaves out is HTTP framing and the per-request
node/run/session fields.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "PRIVATE_STATE_KEY",
    "PrivateStateMismatch",
    "WireSize",
    "has_private_state",
    "load_private_state",
    "message_wire_nbytes",
    "payload_to_record",
    "record_to_payload",
    "store_private_state",
    "wire_nbytes",
]

logger = logging.getLogger(__name__)

#: The key of the client's private state in ``context.state``.
PRIVATE_STATE_KEY = "fedmic.private_state"


def payload_to_record(payload: Mapping[str, "torch.Tensor"]) -> ArrayRecord:
    """One ``Array`` per payload entry, same keys, same order, same dtype and shape."""
    import torch

    record = ArrayRecord()
    for key, tensor in payload.items():
        if not isinstance(key, str):
            raise TypeError(f"Payload keys must be strings, got {type(key).__name__} {key!r}.")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"Payload entry '{key}' is a {type(tensor).__name__}, not a torch.Tensor.")
        if tensor.dtype == torch.bfloat16:
            raise TypeError(
                f"Payload entry '{key}' is bfloat16, which numpy (and so Flower's Array) cannot hold; "
                "cast it to float32 or float16 before it travels."
            )
        # contiguous(): C order for channels-last weights; numpy() keeps 0-d shapes
        record[key] = Array(tensor.detach().cpu().contiguous().numpy())
    return record


def record_to_payload(record: ArrayRecord, device: "torch.device | str | None" = None) -> dict[str, "torch.Tensor"]:
    """The payload back from an ``ArrayRecord`` (writable tensors, optionally on ``device``)."""
    import torch

    out: dict[str, torch.Tensor] = {}
    for key, array in record.items():
        values = array.numpy()
        if not values.flags.writeable:
            values = values.copy()
        tensor = torch.from_numpy(values)
        out[key] = tensor if device is None else tensor.to(device)
    return out


# -- the client's private state ------------------------------------------------------------
class PrivateStateMismatch(RuntimeError):
    """``context.state`` holds a private state written for another run/partition/algorithm."""


def has_private_state(state: RecordDict) -> bool:
    return PRIVATE_STATE_KEY in state


def store_private_state(state: RecordDict, client_state: Mapping[str, Any], *, run_id: int, partition_id: int, algorithm: str) -> int:
    """Serialize ``client_state`` into ``state`` (a ``context.state``); returns its size in bytes."""
    import torch

    buffer = io.BytesIO()
    torch.save(dict(client_state), buffer)
    blob = buffer.getvalue()
    state[PRIVATE_STATE_KEY] = ConfigRecord(
        {"blob": blob, "run-id": int(run_id), "partition-id": int(partition_id), "algorithm": str(algorithm)}
    )
    return len(blob)


def load_private_state(
    state: RecordDict, *, run_id: int, partition_id: int, algorithm: str, device: "torch.device | str" = "cpu"
) -> dict[str, Any]:
    """The client state stored by ``store_private_state`` on this node, checked to belong
    to this run, partition and algorithm."""
    import torch

    record = state[PRIVATE_STATE_KEY]
    if not isinstance(record, ConfigRecord):
        raise PrivateStateMismatch(f"context.state['{PRIVATE_STATE_KEY}'] is a {type(record).__name__}, not a ConfigRecord.")
    tag = (int(record["run-id"]), int(record["partition-id"]), str(record["algorithm"]))
    if tag != (int(run_id), int(partition_id), str(algorithm)):
        raise PrivateStateMismatch(
            f"The private state on this node belongs to (run, partition, algorithm) = {tag}, not "
            f"{(run_id, partition_id, algorithm)}; a SuperNode serves one partition per run."
        )
    # Written by this node's own ClientApp for this run and never sent anywhere, so the
    # full unpickler (needed for modules and optimizers) only reads trusted bytes.
    return torch.load(io.BytesIO(record["blob"]), map_location=device, weights_only=False)


# -- bytes on the wire ----------------------------------------------------------------------
class WireSize(int):
    """An int (the serialized bytes) with the number of unique objects as ``.objects``."""

    objects: int

    def __new__(cls, nbytes: int, objects: int) -> "WireSize":
        out = super().__new__(cls, nbytes)
        out.objects = objects
        return out


def _object_transfer_nbytes(objects: Mapping[str, Any]) -> WireSize:
    from flwr.proto.message_pb2 import PushObjectRequest  # pylint: disable=no-name-in-module

    total = 0
    for object_id, obj in objects.items():
        total += PushObjectRequest(object_id=object_id, object_content=obj.deflate()).ByteSize()
    return WireSize(total, len(objects))


def wire_nbytes(obj: Any) -> WireSize:
    """Serialized size of any Flower object (Message, RecordDict, ArrayRecord, ...): the
    protobuf size of transferring each of its unique nested objects once."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return _object_transfer_nbytes(get_all_nested_objects(obj))


def message_wire_nbytes(message: Message) -> WireSize:
    """Serialized size of everything Flower transfers for ``message``: the Message object
    (metadata) and every unique object of its content, with the protobuf framing of each
    object transfer. Deterministic: the same message gives the same size on both ends."""
    return wire_nbytes(message)
