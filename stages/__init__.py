"""DVC entry points: ``python -m stages.<name>``. Each forwards to the ``selfcal`` CLI."""
