"""Study reporting: the paper's source x method tables, sweep plots, DVC experiment collection."""
