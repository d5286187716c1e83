"""A user's program around `cleanlist_prefect.enrich_dataframe`, run by the harness as a subprocess.

    python -m benchmarks.chaos.frame_driver SOURCE.parquet OUTPUT.csv OPTIONS_JSON

Reads the source into a pandas DataFrame, enriches it in this process (the flow runs against whatever
Prefect server the environment names), writes `.output` to OUTPUT.csv and `.rejects` to
OUTPUT.rejects.csv (the files the harness reads for every source kind), and prints the summary as one JSON
line, like `cleanlist-enrich run --json`. A run that cannot finish raises (the library's documented
way): the driver prints that one line (and the run's summary when the error carries one) and exits
1, as a user's program would.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    source, output, options = Path(argv[0]), Path(argv[1]), json.loads(argv[2])
    import pandas as pd

    from cleanlist_prefect import enrich_dataframe

    frame = pd.read_parquet(source)
    try:
        enriched = enrich_dataframe(frame, **options)
    except Exception as exc:  # the library raises what ended the run; a user's program reports it
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        summary = getattr(exc, "summary", None)  # `RunFailed.summary`: what the run did before it ended
        if summary is not None:  # its doubt and its rows count too (as `cleanlist-enrich run --json` prints)
            print(json.dumps(summary.model_dump(mode="json"), default=str))
        return 1
    enriched.output.to_csv(output, index=False)
    enriched.rejects.to_csv(output.with_name(output.stem + ".rejects.csv"), index=False)
    print(json.dumps(enriched.summary.model_dump(mode="json"), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
