"""slimserve service: HTTP upload, job queue, worker and serving (lands with its own issue)."""
