"""Ray entry points. Each script parses arguments, builds a config and calls the ``ichmodel`` library."""
