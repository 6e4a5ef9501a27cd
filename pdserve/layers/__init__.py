"""The models' building blocks as modules: linear layers (with tensor parallelism), norms, rotary
embedding and attention backends. Each calls the implementation the runner chose once (pdserve/kernels/)."""
