"""The fault-schedule harness (issue 23): random schedules of sources, options, API readings and process
events against the sandbox, each checked against the invariants in `invariants.py`.

    .venv/bin/python -m benchmarks.chaos --schedules 30 --seed 23          # the CI batch
    .venv/bin/python -m benchmarks.chaos --replay SEED                     # one schedule again
    .venv/bin/python -m benchmarks.chaos --schedules 200 --seed 1 --checkout /tmp/old-main
"""
