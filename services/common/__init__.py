"""Adapter helpers shared by the services: errors, auth, limits, batching threads, caches, protobuf helpers."""
