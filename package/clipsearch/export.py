"""`python -m clipsearch.export`: the door to clipsearch.cli.export."""
from clipsearch.cli.common import run_command
from clipsearch.cli.export import main

if __name__ == "__main__":
    run_command(main)
