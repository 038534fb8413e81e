"""In-process Flower plumbing for fast tests: message identity and a grid of ClientApps.

``InProcessGrid`` delivers each message to a ClientApp called in this process with the node's
own ``Context`` (kept across rounds, as a SuperNode keeps it). A node can be made to fail:
``down`` nodes never answer (as a dead node before the timeout), ``broken`` ones answer with an
error reply (as the SuperLink does for a node that left). Every reply is recorded, so tests can
inspect exactly what each client sent.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from tests.helpers import TINY_CONFIGS

TINY_CONFIG = str(TINY_CONFIGS / "demo_tiny.yaml")
SITES = ["BIDMC", "HK", "UCL"]


@pytest.fixture(autouse=True)
def flower_identity():
    """Messages built outside a Flower runtime need a task identity (the runtime sets it)."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def node_context(node_id: int, node_config: dict, run_config: dict | None = None) -> Context:
    return Context(run_id=1, node_id=node_id, node_config=dict(node_config),
                   state=RecordDict(), run_config=dict(run_config or {}))


class InProcessGrid(Grid):
    """Nodes ``{node_id: (client_app, context)}`` answering in this process."""

    def __init__(self, nodes: dict):
        self.nodes = dict(nodes)
        self.down: set[int] = set()
        self.broken: set[int] = set()
        self.sent: list[tuple[int, Message]] = []  # (node, reply) of every client reply
        self.delivered: list[tuple[int, Message]] = []  # (node, message) of every delivery
        self.before_send = None  # optional hook(messages) called before delivery

    def set_run(self, run_id: int) -> None:
        self._run_id = run_id

    @property
    def run(self):
        return None

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.nodes if n not in self.down]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("use send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        messages = list(messages)
        if self.before_send is not None:
            self.before_send(messages)
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            if node in self.down:
                continue
            if node in self.broken:
                replies.append(Message(Error(code=5, reason="node left"), reply_to=message))
                continue
            app, context = self.nodes[node]
            self.delivered.append((node, message))
            reply = app(message, context)
            self.sent.append((node, reply))
            replies.append(reply)
        return replies


def server_context(run_config: dict) -> Context:
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                   run_config=dict(run_config))
