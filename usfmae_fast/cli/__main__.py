"""``python -m usfmae_fast.cli`` (e.g. under ``torchrun ... -m usfmae_fast.cli pretrain``)."""
import sys

from . import main

sys.exit(main())
