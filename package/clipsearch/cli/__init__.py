"""Command-line entry points: thin flag parsers over the library (`python -m clipsearch.cli.<name>`)."""
