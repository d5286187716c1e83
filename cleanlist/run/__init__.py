"""The run pieces without Prefect: options, context, states, staging, planning, submitting, summaries."""
