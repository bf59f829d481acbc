"""legacyexample: a Flower app of the older API, on the quickstart's model and data."""
