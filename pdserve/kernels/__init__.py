"""The model's operations: each one's torch reference and Triton implementation side by side, chosen
once per model runner from a KernelConfig (config.py) by factory.build_kernels into ops.Kernels."""
