"""slimserve service: HTTP upload, job queue, worker and KServe v2 serving."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("slimserve")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0"
