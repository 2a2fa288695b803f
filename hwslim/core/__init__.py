"""The core: the graph, its operators and channel units, channel configs, costs, rounding,
the slimmable supernet and its materialized plain network; errors and output checks.

Everything else builds on these types; the core imports nothing else of hwslim."""
