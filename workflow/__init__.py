"""The workflow layer above the library: artifact IO and the MLflow service (stages, flows, the CLI use it)."""
