"""Model releases: packaging an edge artifact into a signed manifest, and the registry that
stores and serves them."""
