"""tasks of the DICE pipeline."""
