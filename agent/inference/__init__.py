"""Answering a request: backends, the loaded model, confidence, routing, the circuit breaker,
the cloud client, and ``Agent``, the Python API that puts them together."""
