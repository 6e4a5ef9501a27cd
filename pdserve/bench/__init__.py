"""`pdserve bench`: a load generator and report for any OpenAI-compatible endpoint, ours or another's.

dataset.py   random prompts of an exact token count for the served model's tokenizer
client.py    one streamed request -> a RequestResult (TTFT, ITLs, latency, token counts, error)
runner.py    arrivals (Poisson or all at once), a concurrency cap, the progress bar
metrics.py   the summary of a run (vLLM's field names, so numbers compare) and its table
sweep.py     request rates from low to saturation; the highest goodput at the SLO
plot.py      PNG charts comparing runs: CDFs, throughput / goodput / attainment vs rate
cli.py       `pdserve bench serve | sweep | plot`
"""
