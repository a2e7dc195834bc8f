"""The agent as a device runs it: the model store, updates over MQTT, downloads, telemetry and
its outbox, the systemd integration, and ``AgentService``, which wires them up."""
