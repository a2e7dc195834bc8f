"""The agent's version: in births, and checked against ``min_agent_version``."""

__version__ = "0.1.0"
