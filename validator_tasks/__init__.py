"""Long-context evaluation: RULER- and BABILong-style task generators, scorers, the streaming
evaluation runner, KL evaluation and paired comparison, reports and plots. Knows nothing of chains."""
