"""The front door: `splitserve router` (OpenAI-compatible HTTP and the Generation
gRPC service) in front of the decode workers it finds in the registry."""
