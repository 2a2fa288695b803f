"""Stage: latency tables (their format, profiling, machine conditions) and verification of
an exported model against a table and a budget."""
