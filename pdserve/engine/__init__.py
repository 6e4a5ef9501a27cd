"""The inference engine: requests, blocks, scheduling, the model runner and the step loop."""
