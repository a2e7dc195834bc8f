"""The Open Inference Protocol (KServe v2): its types (``types``), the one JSON + binary
codec (``codec``) and the HTTP routes both Tandem servers mount (``http``, imports FastAPI)."""
