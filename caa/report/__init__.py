"""What a person reads: `caa report`'s page and sections, `caa inspect`'s summary, the sweep's plot
(plots take tables)."""
