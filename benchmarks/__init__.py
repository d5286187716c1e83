"""Reproducible throughput and scale benchmarks of the enrich-contacts pipeline against the sandbox."""
