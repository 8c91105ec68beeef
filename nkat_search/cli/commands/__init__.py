"""One module per subcommand: each has ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``."""
