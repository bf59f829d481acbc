"""The aggregation function: serves the global model read-only and folds in each client's own update."""
