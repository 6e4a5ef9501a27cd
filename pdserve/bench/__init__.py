"""`pdserve bench`: a load generator and report for any OpenAI-compatible endpoint, ours or another's.

dataset.py   random prompts of an exact token count for the served model's tokenizer
client.py    one streamed request -> a RequestResult (TTFT, ITLs, latency, token counts, error)
arrivals.py  when requests arrive: all at once, constant rate, Poisson (seeded)
runner.py    sending a run: arrivals, a concurrency cap, a duration limit (wait or cut), the progress bar
metrics.py   the summary of a run (vLLM's field names, so numbers compare) and its table
definitions.py  guidellm's and aiperf's per-token metrics beside ours, computed from our measurements
repeats.py   a rerun's prompts meeting a warm prefix cache: the history file, cached_tokens, the salt
sweep.py     request rates from low to saturation; the highest goodput at the SLO
plot.py      PNG charts comparing runs: CDFs, throughput / goodput / attainment vs rate
cli.py       `pdserve bench serve | sweep | plot`
"""
