"""The server's side of Flower messaging: which node is which hospital, and what failed.

``NodeMessenger`` pushes one message per hospital and pulls the replies with a timeout,
watching membership so a node that left is noticed at once; it maps partitions to node
ids at the start (``query``) and applies the ``on-node-failure`` policy. It knows nothing
about rounds or algorithms: the ServerApp's transport (``server_app.FlowerClients``) uses
it for every train and evaluate exchange.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from . import task
from .records import message_wire_nbytes

__all__ = ["Exchange", "NodeFailureError", "NodeMessenger", "PartitionNode"]

logger = logging.getLogger("fedmic_pipeline.flower.server_app")

_POLL_S = 0.25
_MEMBERSHIP_CHECK_S = 1.0


class NodeFailureError(RuntimeError):
    """A node failed and ``on-node-failure`` is ``stop`` (or no node is left)."""


@dataclass
class PartitionNode:
    """One hospital as the server knows it: its partition, Flower node id and sizes."""

    partition_id: int
    node_id: int
    num_train: int
    num_val: int
    num_test: int
    failed_in: str | None = None


@dataclass
class Exchange:
    """The outcome of sending one message per key: replies and failures by key."""

    replies: dict[int, Message] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)
    wire_sent: dict[int, int] = field(default_factory=dict)
    unanswered: list[int] = field(default_factory=list)


def _describe_error(reply: Message) -> str:
    """A Flower error reply in words: who failed (the node, its ClientApp) and why."""
    from flwr.common.constant import ErrorCode

    code, reason = reply.error.code, reply.error.reason
    if code == ErrorCode.NODE_UNAVAILABLE:
        return f"the node became unavailable: it left the SuperLink or stopped sending heartbeats (Flower: {reason})"
    if code in (ErrorCode.CLIENT_APP_RAISED_EXCEPTION, ErrorCode.CLIENT_APP_CRASHED, ErrorCode.LOAD_CLIENT_APP_EXCEPTION):
        return f"its ClientApp failed (Flower error {code}): {reason}"
    return f"Flower error {code}: {reason}"



class NodeMessenger:
    """Messages to the hospitals' SuperNodes over ``grid`` (see the module docstring)."""

    def __init__(self, grid: Grid, *, min_nodes: int, node_wait_timeout: float, on_node_failure: str) -> None:
        self.grid = grid
        self.min_nodes = min_nodes
        self.node_wait_timeout = node_wait_timeout
        self.on_node_failure = on_node_failure
        self.partitions: dict[int, PartitionNode] = {}

    def online(self) -> set[int]:
        """The node ids the SuperLink currently lists."""
        return {int(n) for n in self.grid.get_node_ids()}

    def live_partitions(self) -> list[int]:
        """Partitions whose node has not failed and is still connected."""
        online = self.online()
        return [p for p, n in sorted(self.partitions.items()) if n.failed_in is None and n.node_id in online]

    def connect(self) -> dict[int, PartitionNode]:
        """Wait for ``min-nodes`` SuperNodes and map their partitions."""
        self._query_partitions(self._wait_for_nodes())
        return self.partitions

    def exchange(
        self, messages: dict[int, Message], timeout: float, enough: Callable[[dict[int, Message]], bool] | None = None
    ) -> Exchange:
        """Push one message per key, pull replies until all arrived or ``timeout`` (or
        until ``enough(replies)``: the still pending keys then go to ``unanswered``)."""
        out = Exchange()
        if not messages:
            return out
        keys = list(messages)
        for key in keys:
            out.wire_sent[key] = int(message_wire_nbytes(messages[key]))
        ids = list(self.grid.push_messages([messages[k] for k in keys]))
        pending: dict[str, int] = {}
        for key, message_id in zip(keys, ids, strict=True):
            if message_id is None:
                out.failures[key] = "the SuperLink did not accept the message"
            else:
                pending[message_id] = key
        deadline = time.monotonic() + timeout
        next_membership_check = time.monotonic() + _MEMBERSHIP_CHECK_S
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                key = pending.pop(reply.metadata.reply_to_message_id, None)
                if key is None:
                    continue
                if reply.has_error():
                    out.failures[key] = _describe_error(reply)
                else:
                    out.replies[key] = reply
            if pending and enough is not None and enough(out.replies):
                out.unanswered.extend(pending.values())
                pending.clear()
                break
            if pending and time.monotonic() >= next_membership_check:
                # A SuperNode that shuts down (SIGTERM, Ctrl-C) deactivates itself at once;
                # one that crashes (SIGKILL, power loss) stays "online" until its heartbeat
                # expires (~60 s in Flower 1.41), so only the timeout catches it.
                online = {int(n) for n in self.grid.get_node_ids()}
                for message_id, key in list(pending.items()):
                    if messages[key].metadata.dst_node_id not in online:
                        del pending[message_id]
                        out.failures[key] = "the node left the SuperLink while its message was pending"
                next_membership_check = time.monotonic() + _MEMBERSHIP_CHECK_S
            if pending:
                time.sleep(_POLL_S)
        for key in pending.values():
            out.failures[key] = f"no reply within {timeout:.0f}s (round-timeout): the node is down, killed or too slow"
        return out

    def handle_failures(self, stage: str, failures: Mapping[int, str], remaining: int) -> None:
        """Apply ``on-node-failure`` to the failures of one exchange."""
        if not failures:
            return
        lines = []
        for pid, reason in sorted(failures.items()):
            node = self.partitions.get(pid)
            node_txt = f"node {node.node_id}" if node is not None else "node ?"
            lines.append(f"{node_txt} (partition {pid}) failed in {stage}: {reason}")
            if node is not None:
                node.failed_in = stage
        if self.on_node_failure == "stop":
            raise NodeFailureError("; ".join(lines) + ". Stopping the run (on-node-failure = stop).")
        for line in lines:
            logger.warning("%s. Continuing with the %d remaining node(s) (on-node-failure = continue).", line, remaining)
        if remaining == 0:
            raise NodeFailureError(f"No node replied in {stage}: " + "; ".join(lines))

    def _wait_for_nodes(self) -> list[int]:
        deadline = time.monotonic() + self.node_wait_timeout
        while True:
            nodes = sorted(int(n) for n in self.grid.get_node_ids())
            if len(nodes) >= self.min_nodes:
                return nodes
            if time.monotonic() >= deadline:
                raise NodeFailureError(
                    f"Only {len(nodes)} of min-nodes={self.min_nodes} SuperNodes connected within "
                    f"{self.node_wait_timeout:.0f}s (node-wait-timeout). Start more SuperNodes or lower min-nodes."
                )
            time.sleep(0.5)

    def _query_partitions(self, nodes: list[int]) -> None:
        """Ask every connected node for its partition id and sizes.

        Stops waiting once the declared ``num-partitions`` are all mapped, so a stale node
        (crashed, still listed until its heartbeat expires) costs no time. Nodes that do
        not answer are left out with a warning while ``min-nodes`` remain;
        ``on-node-failure`` governs failures during the rounds.
        """
        messages = {n: Message(RecordDict({task.CONFIG_KEY: ConfigRecord({})}), n, "query") for n in nodes}

        def all_mapped(replies: dict[int, Message]) -> bool:
            infos = [r.content[task.CONFIG_KEY] for r in replies.values()]
            declared = max((int(i["num-partitions"]) for i in infos), default=0)
            return declared > 0 and {int(i["partition-id"]) for i in infos} >= set(range(declared))

        exchange = self.exchange(messages, self.node_wait_timeout, enough=all_mapped)
        if exchange.unanswered:
            logger.info(
                "Nodes %s had not answered when every partition was mapped; they are left out.", sorted(exchange.unanswered)
            )
        if exchange.failures:
            failures = "; ".join(f"node {n}: {r}" for n, r in sorted(exchange.failures.items()))
            if len(exchange.replies) < self.min_nodes:
                raise NodeFailureError(
                    f"Only {len(exchange.replies)} nodes answered the partition query (min-nodes={self.min_nodes}): "
                    f"{failures}."
                )
            logger.warning("Nodes failed the partition query and are left out: %s.", failures)
        declared: set[int] = set()
        for node_id, reply in sorted(exchange.replies.items()):
            info = reply.content[task.CONFIG_KEY]
            pid = int(info["partition-id"])
            if pid in self.partitions:
                raise NodeFailureError(
                    f"Partition {pid} is served by two nodes ({self.partitions[pid].node_id} and {node_id}); "
                    "give every SuperNode its own partition-id."
                )
            self.partitions[pid] = PartitionNode(pid, node_id, int(info["num-train"]), int(info["num-val"]), int(info["num-test"]))
            if int(info["num-partitions"]) > 0:
                declared.add(int(info["num-partitions"]))
        if len(declared) > 1:
            logger.warning("Nodes disagree on num-partitions: %s.", sorted(declared))
        if declared and max(declared) != len(self.partitions):
            logger.warning(
                "%d of %d partitions are connected (%s): sampling draws from these only, so results differ from an "
                "in-process run over all %d.", len(self.partitions), max(declared), sorted(self.partitions), max(declared),
            )  # fmt: skip
        logger.info(
            "Partitions -> nodes: %s",
            ", ".join(f"{p.partition_id}->{p.node_id} ({p.num_train} train)" for p in self.partitions.values()),
        )

