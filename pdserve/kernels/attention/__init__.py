"""The Triton paged-attention kernels: KV-cache write, decode (with the new token inside), prefill, tiles."""
