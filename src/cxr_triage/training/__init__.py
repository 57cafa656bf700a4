"""Layer: torch lives here only: datasets, networks, training loops, export."""
