"""``python3 -m mc2gguf.odp``: build (or find) the ODP extension now and say which backend runs."""

import os
import sys

from .extension import backend

name, detail = backend()
print(f"ODP backend: {name} ({detail})")
sys.exit(0 if name != "torch" or os.environ.get("MC2GGUF_ODP_BACKEND") == "torch" else 1)
