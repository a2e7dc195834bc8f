"""The fleet: the store (devices, jobs, telemetry, rollouts), the collector and listener fed
by MQTT, the rollout controller, the fleet API, its command line and the dashboard."""
