"""The HTTP front of one instance: OpenAI-compatible API, request/response models, metrics, error mapping."""
