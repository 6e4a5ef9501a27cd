"""Model code (Llama, Qwen2, Qwen3), the architecture registry, weight loading and model preparation."""
