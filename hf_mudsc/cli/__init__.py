"""`hf-mudsc`: one module per sub-command (`add_arguments(parser)`, `run(args) -> int`); `main` in main.py."""
