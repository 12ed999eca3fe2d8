"""The task-head application: classifiers and segmenters on final tokens over gRPC (``saev.v1.TaskHead``)."""
