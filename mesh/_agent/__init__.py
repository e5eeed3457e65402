"""The sidecar agent: HTTP API, SSE, webhooks and metrics over one node."""

from ._config import AgentConfig, Webhook, load
from ._server import Agent

__all__ = ["Agent", "AgentConfig", "Webhook", "load"]
