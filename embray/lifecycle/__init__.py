"""The lifecycle of versions: how one is made, recorded in MLflow, leased, verified, promoted, collected."""
