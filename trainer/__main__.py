"""`python -m trainer train ...`: the entry point torchrun starts on every rank, with the options of
`saescope train` (see trainer/distributed.py):

    torchrun --nproc-per-node 2 -m trainer train --out RUN [--shard-latents 1] ...
"""

import os
import sys

from saescope.cli import main

code = main(sys.argv[1:])
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # The run is written and the process group shut down (distributed.finish_world); leave without
    # the interpreter's teardown, where a gloo thread still joinable could abort the rank now and
    # then ("terminate called without an active exception"), and torchrun would report the whole
    # finished run as failed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
sys.exit(code)
