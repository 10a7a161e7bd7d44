"""Deployment checks: the container image, compose, Kubernetes manifests and dashboards."""
