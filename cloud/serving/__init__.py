"""The ONNX Runtime OIP server: the model repository, models, dynamic batching, the data
plane and its metrics. Loads neither SQLite nor paho: the hot path stays free of the fleet."""
