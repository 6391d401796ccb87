"""`python -m hf_mudsc` (what `accelerate launch -m hf_mudsc` and `torchrun -m hf_mudsc` run)."""

import sys

from hf_mudsc.cli.main import main

sys.exit(main())
