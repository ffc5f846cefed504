"""On-disk layouts of the run directory's artifacts (readers and writers), one module per file type."""
