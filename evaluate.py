"""Simulated-click evaluation of a SAM-Med3D checkpoint over a dataset folder.

    python evaluate.py --data DIR --checkpoint CKPT --protocol {sammed3d,cvpr25} --clicks N \
        --out OUT [--save-predictions] [--limit K] [--classes C ...]

See ``sammed3d_jax/eval/runner.py`` for the outputs and ``sammed3d_jax/eval/protocols.py`` for
the two protocols. Input errors print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import sys

from sammed3d_jax.eval.runner import main

if __name__ == "__main__":
    sys.exit(main())
