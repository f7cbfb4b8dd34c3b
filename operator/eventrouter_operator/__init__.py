"""Kubernetes operator that reconciles EventRouter resources (not built yet)."""
