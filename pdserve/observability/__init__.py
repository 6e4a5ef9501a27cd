"""What plugs pdserve into a cluster's observability: the model_name label on every metric series
(model_label.py) and OpenTelemetry traces carried router -> decode -> prefill (tracing.py)."""
