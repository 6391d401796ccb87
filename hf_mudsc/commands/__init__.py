"""CLI sub-commands, one module each (`add_arguments(parser)`, `run(args) -> int`)."""
