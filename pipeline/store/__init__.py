"""Ray-free storage: filesystems and atomic writes, sources, decode, the output contract, the
reader (one identity selector), the lease and reconciliation. Never imports Ray."""
