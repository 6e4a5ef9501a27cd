"""Prefill/decode disaggregation: the connector the engine sees, the control protocol, KV transports."""
