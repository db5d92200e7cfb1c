"""The federated-learning core: torch and numpy only, no Kedro, MLflow, GX or file paths."""
