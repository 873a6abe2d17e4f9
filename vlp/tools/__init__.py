"""Tools: the AOT compile check and (later) importers."""
