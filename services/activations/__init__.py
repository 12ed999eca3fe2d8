"""The activations application: a ViT's residual stream over gRPC (``saev.v1.Activations``)."""
