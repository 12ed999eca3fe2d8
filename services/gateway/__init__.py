"""The gateway application: the HTTP API and the composed gRPC services (Interventions, Jobs, Features).

Imports neither torch nor the model services' modules (it reaches them through DeploymentHandles).
"""
