"""KV transports: how control messages and KV bytes travel between instances."""
