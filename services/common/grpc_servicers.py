"""The ``add_*Servicer_to_server`` functions Ray Serve's gRPC proxy imports (``grpc_options``), in one place."""

from sae_shared.proto.saev.v1.activations_pb2_grpc import add_ActivationsServicer_to_server
from sae_shared.proto.saev.v1.features_pb2_grpc import add_FeaturesServicer_to_server
from sae_shared.proto.saev.v1.interventions_pb2_grpc import add_InterventionsServicer_to_server
from sae_shared.proto.saev.v1.jobs_pb2_grpc import add_JobsServicer_to_server
from sae_shared.proto.saev.v1.sae_pb2_grpc import add_SAEServicer_to_server
from sae_shared.proto.saev.v1.taskhead_pb2_grpc import add_TaskHeadServicer_to_server

__all__ = [
    "add_ActivationsServicer_to_server",
    "add_FeaturesServicer_to_server",
    "add_InterventionsServicer_to_server",
    "add_JobsServicer_to_server",
    "add_SAEServicer_to_server",
    "add_TaskHeadServicer_to_server",
]
