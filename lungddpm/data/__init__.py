"""Data sources: pylidc adapter (``lidc``) and the procedural demo phantom (``phantom``)."""
