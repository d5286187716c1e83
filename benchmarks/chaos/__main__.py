"""`python -m benchmarks.chaos`: run a batch of schedules (or replay one) and print one JSON line."""

from __future__ import annotations

import sys

from benchmarks.chaos.batch import main

sys.exit(main())
