"""Subcommands of the ``loramix`` command line; each module has ``add_parser(subparsers)`` and ``run(args)``."""
