"""The command line: argparse front, one module per command, process launching."""
