"""The SAE application: encode, decode, edit and rank latents over gRPC (``saev.v1.SAE``)."""
