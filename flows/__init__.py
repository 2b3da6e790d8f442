"""flows of the DICE pipeline."""
