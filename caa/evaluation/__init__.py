"""The sweep's evaluation: the engines (reference and cached), scores, the fluency cost and the
statistics over held-out items."""
