"""Files and records on disk: atomic writes, untrusted text, record readers, the artifacts' schemas,
readers and writers, checkpoints, output checks and the packaged datasets. Imports nothing of caa but
`caa.errors`."""
