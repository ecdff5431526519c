"""openpi-client's own resize_with_pad on uint8 frames: run by the tests with the openpi-client venv's python
(scripts/peers.sh), never imported by the project.

    <openpi-client venv>/bin/python test/peers/openpi_client_resize.py IN.npz OUT.npz

Every frame of IN.npz (uint8 HxWx3) goes through `openpi_client.image_tools.resize_with_pad(frame, 224, 224)`,
what openpi's example robots run on each camera image before sending it to the policy server.
"""

from __future__ import annotations

import sys

import numpy as np
from openpi_client import image_tools


def main(frames: str, out: str) -> int:
    np.savez(out, **{key: image_tools.resize_with_pad(frame, 224, 224) for key, frame in np.load(frames).items()})
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
