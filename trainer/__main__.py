"""`python -m trainer train ...`: the entry point torchrun starts on every rank, with the options of
`saescope train` (see trainer/distributed.py):

    torchrun --nproc-per-node 2 -m trainer train --out RUN [--shard-latents 1] ...
"""

import sys

from saescope.cli import main

sys.exit(main(sys.argv[1:]))
