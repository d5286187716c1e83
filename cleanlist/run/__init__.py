"""The run pieces without Prefect: options, context, staging, planning, submitting, the join of results to
rows (`write.py`), summaries. The shared words are in `cleanlist/vocab.py`."""
