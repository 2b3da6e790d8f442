"""deployments of the DICE pipeline."""
